"""Packed-model checkpoints: `save_packed` / `load_packed` (the `qvlm deploy --out DIR` format).

    save_packed(model, "runs/w4a4-packed", processor=processor)    # packed.safetensors + qvlm_packed.json + base/
    model, processor = load_packed("runs/w4a4-packed")              # or qvlm.loading.load("runs/w4a4-packed")

The directory is self-contained (the LlavaConfig and processor are stored under base/), written atomically, and
read back strictly: a missing tensor, a truncated file or a config mismatch is a one-line QVLMError.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from ..core.qlinear import restore_rotated_linears, rotated_linears, set_module
from ..errors import QVLMError
from ..models import llava
from ..utils import atomic_dir
from .fuse import is_fused
from .layer import DeployedLinear, layer_spec, packed_linears, scheme

PACKED_META = "qvlm_packed.json"        # presence of this file marks a packed-model directory
PACKED_TENSORS = "packed.safetensors"
FORMAT_VERSION = 1


def _processor_for(model, processor):
    """The processor to store: the one given, else the one beside the checkpoint the model was loaded from."""
    if processor is not None:
        return processor
    ref = getattr(model, "name_or_path", "") or ""
    if ref and (Path(ref) / "config.json").is_file():
        return AutoProcessor.from_pretrained(ref)
    raise QVLMError("no processor given and the model was not loaded from a checkpoint directory",
                    "pass processor= (the one returned by qvlm.models.load / build_random)")


def _shared_names(state: dict) -> dict[str, str]:
    """{name: first name} for every state-dict entry that is a view of an earlier one (tied embeddings / lm_head:
    safetensors stores a tensor once, so the duplicates are written as aliases and re-pointed on load)."""
    first, alias = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in first:
            alias[name] = first[key]
        else:
            first[key] = name
    return alias


def save_packed(model: nn.Module, out_dir, processor=None, source: dict | None = None) -> Path:
    """Write a packed-model directory atomically (nothing half-written on error):

        packed.safetensors   every tensor of the model: packed codes (uint8 / int8), fp32 scales, the FP rest
        qvlm_packed.json     format_version, scheme, per-layer specs, dtype, `source` (e.g. the quantized dir),
                             `tied` (names stored once: {alias: stored name}, e.g. lm_head.weight -> embed_tokens)
        base/                the LlavaConfig and the processor, so the directory is self-contained
    """
    pls = packed_linears(model)
    if not pls:
        raise QVLMError("the model has no packed layers", "call qvlm.deploy.deploy(model) first")
    if is_fused(model):
        raise QVLMError("the model has fused q|k|v / gate|up layers (a serving-time view, not a checkpoint layout)",
                        "save before fuse_shared_inputs(), and fuse again after load_packed()")
    processor = _processor_for(model, processor)
    state = model.state_dict()
    tied = _shared_names(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in tied}
    meta = dict(format_version=FORMAT_VERSION, scheme=scheme(model), layers={n: layer_spec(m) for n, m in pls}, tied=tied,
                dtype=str(llava.model_dtype(model)).replace("torch.", ""), source=source or {},
                notes=getattr(model, "qvlm_deploy", {}).get("notes", []), rotated_linears=rotated_linears(model))
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / PACKED_TENSORS))
        model.config.save_pretrained(tmp / "base")
        processor.save_pretrained(tmp / "base")
        (tmp / PACKED_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)


def read_packed_meta(path) -> dict:
    """The parsed qvlm_packed.json of a packed-model directory (QVLMError if absent / unreadable / wrong version)."""
    path = Path(path)
    if not path.is_dir():
        raise QVLMError(f"{path} not found (not a directory)", "pass a directory written by `qvlm deploy`")
    f = path / PACKED_META
    if not f.is_file():
        raise QVLMError(f"{path} is not a packed-model directory (no {PACKED_META})",
                        "create one with `qvlm deploy QUANTIZED_DIR --out DIR`")
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QVLMError(f"cannot read {f}: {type(e).__name__}", "re-run `qvlm deploy` to rewrite it") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise QVLMError(f"{path} has packed format {meta.get('format_version')!r}, expected {FORMAT_VERSION}",
                        "re-run `qvlm deploy` with this version of qvlm")
    return meta


def load_packed(path, device: str = "cpu", dtype: str = "") -> tuple[nn.Module, object]:
    """(model, processor) from a directory written by save_packed; packed layers are DeployedLinear. Eval mode.
    `dtype` ("" = as saved) casts the FP tensors; codes and scales keep their stored dtypes."""
    path = Path(path)
    meta = read_packed_meta(path)
    dtype = dtype or meta["dtype"]
    if dtype not in ("float32", "float16", "bfloat16"):
        raise QVLMError(f"unknown dtype {dtype!r}", "use float32, float16 or bfloat16")
    tdtype = getattr(torch, dtype)
    try:
        tensors = load_file(str(path / PACKED_TENSORS))
        config = LlavaConfig.from_pretrained(path / "base")
        processor = AutoProcessor.from_pretrained(path / "base")
    except (OSError, ValueError, RuntimeError) as e:
        raise QVLMError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                        "the directory is incomplete or corrupt; re-run `qvlm deploy`") from None
    with no_init_weights():                                           # every tensor is overwritten below
        model = LlavaForConditionalGeneration(config).to(tdtype).eval()
    for name, s in meta["layers"].items():
        layer = DeployedLinear(s["in_features"], s["out_features"], s["w_bits"], s["a_bits"], s["group_size"], s["symmetric"],
                    bias=s["bias"], dtype=tdtype, act=s["act"], a_granularity=s["a_granularity"],
                    input_transform=s.get("input_transform"))
        layer.drop_zero_point()
        for t in s["tensors"]:
            key = f"{name}.{t}"
            if key not in tensors:
                raise QVLMError(f"{path} lacks tensor {key}", "the directory is incomplete; re-run `qvlm deploy`")
            layer.register_buffer(t, tensors.pop(key))
        set_module(model, name, layer)
    restore_rotated_linears(model, meta.get("rotated_linears", []))   # FP linears with an online Hadamard
    for alias, name in meta.get("tied", {}).items():                  # stored once (tied embeddings)
        if name not in tensors:
            raise QVLMError(f"{path} lacks tensor {name} (tied to {alias})", "the directory is incomplete; re-run `qvlm deploy`")
        tensors[alias] = tensors[name]
    try:
        model.load_state_dict(tensors, strict=True)                   # copy_ casts FP tensors to `dtype`
    except RuntimeError as e:
        raise QVLMError(f"{path} does not match its config: {str(e).splitlines()[0][:160]}",
                        "the directory is incomplete or corrupt; re-run `qvlm deploy`") from None
    for alias, name in meta.get("tied", {}).items():                  # share the storage again, as saved
        mod, attr = alias.rsplit(".", 1)
        setattr(model.get_submodule(mod), attr, model.get_parameter(name))
    model.qvlm_deploy = dict(modes=meta["scheme"]["kernels"], activations=meta["scheme"]["activations"],
                             notes=meta.get("notes", []), source=meta.get("source", {}))
    return model.to(device).eval(), processor
