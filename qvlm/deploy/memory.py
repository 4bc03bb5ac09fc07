"""Memory of a quantized model: bytes of the packed linear weights and of the whole model vs FP16, measured on a
packed model (and its directory) or computed by formula from a model's discovered structure.

    memory_report(packed_model, packed_dir)          measured, per category (codes, scales, embeddings, norms, ...)
    formula_bytes(model, w_bits, group_size, fmt=)   by formula from llava.linear_layers(model): works on a model
                                                     built on the meta device, e.g. reference_model("llava-1.5-13b");
                                                     fmt "qvlm" (ours) or "compressed-tensors" (`qvlm export`)
    memory_table({name: model}, settings)            both formats side by side, one row per model x setting x format
    reference_model(name)                            LLaVA-1.5-7B / 13B on the meta device (no weights), from their
                                                     public config values, to state memory at the paper's widths

What stays FP16 in every format here: input embeddings, lm_head, norms, biases, the vision tower's patch and position
embeddings, and any linear outside the quantized scope.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..config import SCOPES
from ..errors import QVLMError
from ..models import llava
from .checkpoint import PACKED_TENSORS
from .layer import is_packed

FP16_BYTES = 2


MEMORY_FORMATS = ("qvlm", "compressed-tensors")


def linear_bytes(out_features: int, in_features: int, w_bits: int = 4, group_size: int = 0,
                 symmetric: bool = True, fmt: str = "qvlm") -> dict:
    """Bytes of one quantized linear weight vs its FP16 weight, by formula, in one of MEMORY_FORMATS:

        qvlm                 our packed checkpoint: int4 codes two per byte (w_bits <= 4) or int8 codes, fp32
                             scales [+ fp32 zero points] per channel or group (kernels.PackedLinear)
        compressed-tensors   `qvlm export`: codes packed densely into int32 words (ceil(K * w_bits / 32) per row:
                             pack-quantized) or int8 (w8a8: int-quantized), scales in the serving dtype (FP16 here),
                             int8 zero points (asymmetric int-quantized), weight_shape (2 x int64, pack-quantized)
    """
    if fmt not in MEMORY_FORMATS:
        raise QVLMError(f"unknown memory format {fmt!r}", f"use one of {', '.join(MEMORY_FORMATS)}")
    n_groups = in_features // group_size if group_size else 1
    if fmt == "qvlm":
        container = 4 if w_bits <= 4 else 8
        codes = out_features * in_features * container // 8
        qparams = out_features * n_groups * 4 * (1 if symmetric else 2)
    else:
        packed = w_bits < 8
        codes = out_features * (-(-in_features * w_bits // 32) * 4 if packed else in_features)
        qparams = out_features * n_groups * (FP16_BYTES + (0 if symmetric else 1)) + (16 if packed else 0)
    fp16 = out_features * in_features * FP16_BYTES
    return dict(codes=codes, qparams=qparams, bytes=codes + qparams, fp16_bytes=fp16, ratio=fp16 / (codes + qparams))


# Public config values of llava-hf/llava-1.5-{7b,13b}-hf: CLIP ViT-L/14 at 336 px, a 2-layer GELU projector, a
# Vicuna (LLaMA) decoder; 32064 = LLaMA's 32000 tokens + the image and pad tokens llava-hf adds.
REFERENCE_CONFIGS = {
    "llava-1.5-7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)),
    "llava-1.5-13b": dict(text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, num_key_value_heads=40, vocab_size=32064)),
}
_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)


def reference_model(name: str) -> nn.Module:
    """A LLaVA-1.5 model of the named size on the meta device (structure only, no memory, no weights)."""
    if name not in REFERENCE_CONFIGS:
        raise QVLMError(f"unknown reference model {name!r}", f"use one of {', '.join(REFERENCE_CONFIGS)}")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_CLIP_L_336),
                      text_config=LlamaConfig(**REFERENCE_CONFIGS[name]["text"], tie_word_embeddings=False),
                      image_token_index=32000, vision_feature_layer=-2, projector_hidden_act="gelu")
    with torch.device("meta"):
        return LlavaForConditionalGeneration(cfg).eval()


def formula_bytes(model: nn.Module, w_bits: int = 4, group_size: int = 0, symmetric: bool = True,
                  scope=SCOPES, fmt: str = "qvlm") -> dict:
    """Packed vs FP16 bytes of `model` by formula: every linear of `scope` (llava.linear_layers) packed with
    linear_bytes in format `fmt` (a group size that does not divide a width falls back to per channel), every
    other parameter FP16. Keys: linear_bytes, linear_fp16_bytes, linear_ratio, rest_fp16_bytes, model_bytes,
    model_fp16_bytes, model_ratio, n_linears."""
    lins = llava.linear_layers(model, scope)
    ids = {id(i.module.weight) for i in lins}
    lb = lf = 0
    for i in lins:
        m = i.module
        g = group_size if group_size and m.in_features % group_size == 0 else 0
        b = linear_bytes(m.out_features, m.in_features, w_bits, g, symmetric, fmt)
        lb, lf = lb + b["bytes"], lf + b["fp16_bytes"]
    seen, rest = set(ids), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            rest += p.numel() * FP16_BYTES
    return dict(n_linears=len(lins), linear_bytes=lb, linear_fp16_bytes=lf, linear_ratio=lf / lb,
                rest_fp16_bytes=rest, model_bytes=lb + rest, model_fp16_bytes=lf + rest,
                model_ratio=(lf + rest) / (lb + rest))


def memory_table(models: dict[str, nn.Module], settings=((4, 0), (4, 128), (8, 0)), scope=SCOPES) -> list[dict]:
    """One row per (model, setting, format): linear and whole-model bytes vs FP16 by formula (formula_bytes), for
    our packed format and compressed-tensors. `settings` are (w_bits, group_size) pairs; 8 bits is the W8A8 weight
    (int8 codes in both formats). What stays FP16 is the same in both: see the module docstring."""
    rows = []
    for name, model in models.items():
        for w_bits, group_size in settings:
            for fmt in MEMORY_FORMATS:
                f = formula_bytes(model, w_bits, group_size, True, scope, fmt)
                rows.append(dict(model=name, setting=f"W{w_bits}" + (f"G{group_size}" if group_size else ""),
                                 format=fmt, linear_mib=f["linear_bytes"] / 2 ** 20,
                                 linear_fp16_mib=f["linear_fp16_bytes"] / 2 ** 20, linear_ratio=f["linear_ratio"],
                                 fp16_rest_mib=f["rest_fp16_bytes"] / 2 ** 20, model_mib=f["model_bytes"] / 2 ** 20,
                                 model_fp16_mib=f["model_fp16_bytes"] / 2 ** 20, model_ratio=f["model_ratio"]))
    return rows


CATEGORIES = ("linear codes", "linear scales / zero points", "activation quant params", "linear biases",
              "FP linears", "embeddings", "lm_head", "norms", "other")


def _categorise(model: nn.Module) -> dict[str, tuple[str, int]]:
    """{tensor name: (category, FP16 bytes of what it replaces)} for every parameter and buffer of the model."""
    out = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mname, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False)) + [(n, b) for n, b in mod.named_buffers(recurse=False)]
        for tname, t in own:
            key = f"{mname}.{tname}" if mname else tname
            fp16 = t.numel() * FP16_BYTES if t.is_floating_point() else t.numel() * t.element_size()
            if is_packed(mod):
                if tname == "qweight":
                    cat, fp16 = "linear codes", mod.out_features * mod.in_features * FP16_BYTES
                elif tname in ("scale", "zero_point"):
                    cat, fp16 = "linear scales / zero points", 0
                elif tname == "bias":
                    cat = "linear biases"
                else:
                    cat, fp16 = "activation quant params", 0
            elif mod is head:
                cat = "lm_head"
            elif isinstance(mod, nn.Embedding):
                cat = "embeddings"
            elif "Norm" in type(mod).__name__:
                cat = "norms"
            elif isinstance(mod, nn.Linear):
                cat = "FP linears"
            else:
                cat = "other"
            out[key] = (cat, fp16)
    return out


def _safetensors_sizes(file: Path) -> dict[str, int]:
    """{tensor name: bytes on disk} from a safetensors header (8-byte length + JSON with data_offsets)."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def memory_report(model: nn.Module, packed_dir=None) -> dict:
    """Bytes per category (packed linear codes, their scales, the FP rest: embeddings, lm_head, norms, ...) in
    memory and, with `packed_dir`, on disk, each against the same model in FP16. Keys:

        rows     one dict per category: category, tensors, bytes, fp16_bytes, ratio (= fp16 / bytes), disk_bytes
        linear   the quantized linear weights (codes + scales / zero points) vs their FP16 weights
        total    the whole model; `bytes_fp16_rest` = packed linears + everything else cast to FP16
        disk     (with packed_dir) file sizes of the directory vs an FP16 safetensors estimate
    """
    cats = _categorise(model)
    seen, mem = set(), {}
    for key, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or key in seen or key not in cats:
            continue
        seen.add(key)
        mem[key] = t.numel() * t.element_size()
    disk = _safetensors_sizes(Path(packed_dir) / PACKED_TENSORS) if packed_dir else {}
    rows = []
    for c in CATEGORIES:
        keys = [k for k in mem if cats[k][0] == c]
        if not keys:
            continue
        b, f = sum(mem[k] for k in keys), sum(cats[k][1] for k in keys)
        row = dict(category=c, tensors=len(keys), bytes=b, fp16_bytes=f, ratio=round(f / b, 3) if b else None)
        if packed_dir:
            row["disk_bytes"] = sum(disk.get(k, 0) for k in keys)
        rows.append(row)
    by = {r["category"]: r for r in rows}
    lin_b = sum(by[c]["bytes"] for c in ("linear codes", "linear scales / zero points") if c in by)
    lin_f = sum(by[c]["fp16_bytes"] for c in ("linear codes", "linear scales / zero points") if c in by)
    tot_b, tot_f = sum(r["bytes"] for r in rows), sum(r["fp16_bytes"] for r in rows)
    packed_cats = ("linear codes", "linear scales / zero points", "activation quant params")
    rest_f = sum(r["fp16_bytes"] for r in rows if r["category"] not in packed_cats)
    rep = dict(rows=rows,
               linear=dict(bytes=lin_b, fp16_bytes=lin_f, ratio=lin_f / lin_b if lin_b else None,
                           fraction=lin_b / lin_f if lin_f else None),
               total=dict(bytes=tot_b, fp16_bytes=tot_f, ratio=tot_f / tot_b, fraction=tot_b / tot_f,
                          bytes_fp16_rest=tot_b - sum(r["bytes"] for r in rows if r["category"] not in packed_cats)
                          + rest_f))
    rep["total"]["ratio_fp16_rest"] = tot_f / rep["total"]["bytes_fp16_rest"]
    if packed_dir:
        files = sum(f.stat().st_size for f in Path(packed_dir).rglob("*") if f.is_file())
        fp16_disk = sum(cats[k][1] for k in disk if k in cats)
        rep["disk"] = dict(dir_bytes=files, tensor_file_bytes=(Path(packed_dir) / PACKED_TENSORS).stat().st_size,
                           fp16_tensor_bytes=fp16_disk, ratio=fp16_disk / sum(disk.values()))
    return rep


