"""Quantized-model checkpoints: `save_quantized` / `load_quantized` (the `qvlm quantize --out DIR` format).

    save_quantized(model, qcfg, method_info, out_dir, processor=..., base_model="tiny")
    model, processor = load_quantized(out_dir)

A directory holds `qvlm_quant.json` (format version, quantization config, method record, per-layer QuantLinear
settings, the base model's name or path) and `quantized.safetensors`: integer weight codes + (w_scale, w_zero_point)
of each QuantLinear, its optional tensors (input_scale, static a_scale, learned a_clip, ...), and every other
tensor the method CHANGED (found by comparing with the fingerprint `qvlm.methods.quantize` took before anything
changed: norms that smoothing rescaled, a vision tower that VEO trained). Everything else is reloaded from the base
model. A model whose base cannot be reloaded by name (e.g. a random test model) is stored whole, with its config and
processor under base/, in the same format. Writes are atomic: a failure leaves nothing half-written.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from .. import models
from ..config import QuantConfig
from ..errors import QVLMError
from ..models import llava
from ..utils import atomic_dir
from .qlinear import (QuantLinear, quant_linears, restore_rotated_linears, rotated_linears, set_module,
                      share_act_quantizer)

QUANT_META = "qvlm_quant.json"          # presence of this file marks a quantized-model directory
QUANT_TENSORS = "quantized.safetensors"
FORMAT_VERSION = 1


def _base_reference(model: nn.Module, base_model: str | None) -> str | None:
    """A shipped model's name ('tiny', 'smol'), an absolute checkpoint directory, or None when the base cannot be reloaded (save it inline)."""
    ref = base_model or getattr(model, "name_or_path", "") or ""
    if ref in models.SHIPPED:
        return ref
    if ref and (Path(ref) / "config.json").is_file() and not (Path(ref) / QUANT_META).is_file():
        return str(Path(ref).resolve())
    return None


FINGERPRINT_ATTR = "_qvlm_fp_fingerprint"   # set on the model by qvlm.methods.quantize before anything changes


@torch.no_grad()
def fingerprint(model: nn.Module) -> dict[str, tuple]:
    """{state-dict key: (sum, sum of squares, position-weighted sum)} in float64: a cheap per-tensor checksum that
    tells, at save time, which FP tensors a method changed (smoothing folds into norms, VEO trains the vision tower)."""
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            continue
        t = v.detach().reshape(-1).double()
        w = (torch.arange(t.numel(), device=t.device) % 1009 + 1).double()
        out[k] = (float(t.sum()), float(t.pow(2).sum()), float((t * w).sum()))
    return out


def save_quantized(model: nn.Module, qcfg: QuantConfig, method_info: dict, out_dir, *, processor=None,
                   base_model: str | None = None) -> Path:
    """Write a quantized model directory atomically: qvlm_quant.json + quantized.safetensors (+ base/ if needed).

    Stored: integer codes + (w_scale, w_zero_point) of each QuantLinear (FP weights for NF4 / 16-bit layers) and its
    optional tensors (input_scale, static a_scale, ...); plus every other tensor the method CHANGED (e.g. norms
    rescaled by smoothing, a vision tower trained by Q-VLM's VEO), found by comparing with the fingerprint that
    qvlm.methods.quantize took before quantizing (without one: every tensor but the input embeddings and lm_head).
    Everything else comes from the base model ('tiny' or a checkpoint path). A model whose base cannot be reloaded
    (e.g. build_random) is stored whole, with its config and processor, in the same format."""
    qls = quant_linears(model)
    if any(not m.weight_on_grid for _, m in qls):
        raise QVLMError("the model has unfrozen QuantLinear layers", "call qvlm.qlinear.freeze_model(model) first")
    base = _base_reference(model, base_model)
    if base is None and processor is None:
        raise QVLMError("the base model cannot be reloaded by name and no processor was given",
                        "pass base_model='tiny' / a checkpoint path, or processor= to store the model whole")
    tensors, lin_names = {}, {n for n, _ in qls}
    for name, m in qls:
        for k, v in m.export_tensors().items():
            tensors[f"{name}.{k}"] = v
    before = getattr(model, FINGERPRINT_ATTR, None)
    now = fingerprint(model) if before is not None else {}
    never = {_state_key(model, model.get_input_embeddings()), _state_key(model, model.get_output_embeddings())}
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner in lin_names or owner.removesuffix(".act") in lin_names:
            continue
        if base is not None:
            if before is not None and (k in before and before[k] == now.get(k)):
                continue                                      # unchanged: comes from the base checkpoint
            if before is None and k in never:
                continue
        tensors[k] = v.detach().contiguous()
    meta = dict(format_version=FORMAT_VERSION, base_model=base, self_contained=base is None,
                quant_config=dataclasses.asdict(qcfg), method=method_info,
                dtype=str(llava.model_dtype(model)).replace("torch.", ""),
                linears={name: m.spec() for name, m in qls}, shared_act=shared_groups(qls),
                tied_embeddings=llava.tied_embeddings(model), rotated_linears=rotated_linears(model))
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / QUANT_TENSORS))
        if base is None:
            model.config.save_pretrained(tmp / "base")
            processor.save_pretrained(tmp / "base")
        (tmp / QUANT_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)


def shared_groups(qls: list[tuple[str, QuantLinear]]) -> list[list[str]]:
    """Names of the QuantLinears that share one activation quantizer (groups of two or more)."""
    by: dict[int, list[str]] = {}
    for name, m in qls:
        by.setdefault(id(m.act), []).append(name)
    return [g for g in by.values() if len(g) > 1]


def _state_key(model: nn.Module, module: nn.Module | None) -> str:
    """The state-dict key of `module`'s weight ('' if it has none)."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}.weight"
    return ""


def read_meta(path) -> dict:
    """The parsed qvlm_quant.json of a quantized-model directory."""
    f = Path(path) / QUANT_META
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QVLMError(f"cannot read {f}: {type(e).__name__}",
                        "re-run `qvlm quantize` to rewrite the directory") from None


def load_quantized(path, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) from a directory written by save_quantized. Model in eval mode, layers frozen."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise QVLMError(f"{path} has quantized-model format {meta.get('format_version')!r}, expected {FORMAT_VERSION}",
                        "re-run `qvlm quantize` with this version of qvlm")
    if meta["self_contained"]:
        config = LlavaConfig.from_pretrained(path / "base")
        model = LlavaForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
        processor = AutoProcessor.from_pretrained(path / "base")
    else:
        model, processor = models.load(meta["base_model"], device="cpu", dtype=dtype)
    if not (path / QUANT_TENSORS).is_file():
        raise QVLMError(f"{path} has no {QUANT_TENSORS}", "re-run `qvlm quantize` to rewrite the directory")
    try:
        tensors = load_file(str(path / QUANT_TENSORS))
    except (OSError, ValueError, RuntimeError) as e:
        raise QVLMError(f"cannot read {path / QUANT_TENSORS}: {type(e).__name__}",
                        "the directory is corrupt; re-run `qvlm quantize`") from None
    for name, spec in meta["linears"].items():
        lin = model.get_submodule(name)
        ql = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                         dtype=lin.weight.dtype, **spec)
        prefix = name + "."
        ql.import_tensors({k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)
                           and "." not in k[len(prefix):]})
        set_module(model, name, ql)
    restore_rotated_linears(model, meta.get("rotated_linears", []))   # FP linears with an online Hadamard
    for group in meta.get("shared_act", []):                      # one activation quantizer per input tensor
        share_act_quantizer([model.get_submodule(n) for n in group])
    if llava.tied_embeddings(model) and not meta.get("tied_embeddings", True):   # a transform untied them (rotate)
        llava.untie_lm_head(model)
    sd_dtype = llava.model_dtype(model)
    missing, unexpected = model.load_state_dict({k: v.to(sd_dtype) if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, strict=False)
    ql_names = set(meta["linears"])
    missing = [k for k in missing if k.rsplit(".", 1)[0].removesuffix(".act") not in ql_names]
    if meta["self_contained"] and missing:
        raise QVLMError(f"{path} lacks tensor {missing[0]}", "the directory is incomplete; re-run `qvlm quantize`")
    if unexpected:
        raise QVLMError(f"{path} holds tensors the model does not have (e.g. {unexpected[0]})",
                        "the base model differs from the one that was quantized")
    model.to(device).eval()
    return model, processor
