"""FP model loading: a shipped testbed ("tiny", "smol") or any local llava-hf LLaVA checkpoint directory, same code.

    model, processor = qvlm.models.load("tiny")
    model, processor = qvlm.models.load("/models/llava-1.5-7b-hf", device="cuda", dtype="float16")

Never downloads: HF_HUB_OFFLINE is forced, and a name that is not a shipped model must be a local directory.
Quantized (`qvlm quantize --out`) and packed (`qvlm deploy --out`) directories load through `qvlm.loading.load`,
which dispatches on the directory's marker file and calls this function for the FP base.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ..errors import QVLMError
from ..paths import TINY_DIR
from . import llava, smol  # noqa: F401  (llava: structure discovery; smol: the real-weights testbed)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHIPPED = ("tiny", "smol")         # model names that load without a path (their files ship under data/)
MARKERS = {"qvlm_quant.json": "a `qvlm quantize` output", "qvlm_packed.json": "a `qvlm deploy` output",
           "qvlm_export.json": "a `qvlm export` output"}


def resolve_path(name_or_path: str) -> Path:
    """'tiny' -> the shipped testbed; otherwise a local llava-hf checkpoint directory (checked)."""
    path = TINY_DIR if name_or_path == "tiny" else Path(name_or_path)
    if not path.is_dir():
        hint = "run `python -m qvlm.testbed.train` to rebuild it" if name_or_path == "tiny" else \
            "pass 'tiny' or a local llava-hf LLaVA checkpoint directory (nothing is downloaded)"
        raise QVLMError(f"model {name_or_path!r} not found: {path} is not a directory", hint)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise QVLMError(f"{path} is not a LLaVA checkpoint (no config.json)",
                        "pass a directory written by save_pretrained of a llava-hf model")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError:
        raise QVLMError(f"{cfg} is not valid JSON", "restore the checkpoint's config.json") from None
    if model_type != "llava":
        raise QVLMError(f"{path} is a {model_type!r} checkpoint, not LLaVA",
                        "pass a llava-hf LlavaForConditionalGeneration checkpoint (model_type 'llava')")
    return path


def load(name_or_path: str = "tiny", device: str = "cpu", dtype: str = "float32", device_map=None):
    """(model, processor) of an FP model: 'tiny', 'smol' or a local llava-hf checkpoint directory (eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for marker, what in MARKERS.items():
        if name_or_path not in SHIPPED and (Path(name_or_path) / marker).is_file():
            raise QVLMError(f"{name_or_path} is {what}, not an FP checkpoint",
                            "load it with qvlm.loading.load (the CLI does), or pass the FP model it was made from")
    if dtype not in _DTYPES:
        raise QVLMError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    if name_or_path == "smol":
        return smol.load(device=device, dtype=dtype)
    path = resolve_path(name_or_path)
    if dtype not in _DTYPES:
        raise QVLMError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QVLMError(f"device {device!r} requested but no GPU is available", "use --device cpu with MODEL='tiny'")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise QVLMError(f"{path} has no weight files (*.safetensors)", "copy the checkpoint's weight files there")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=_DTYPES[dtype], device_map=device_map)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # truncated / corrupt weight files
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QVLMError(f"cannot load weights from {path}: {first}",
                        "the checkpoint is corrupt or incomplete; restore it (tiny: `python -m qvlm.testbed.train`)") from None
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise QVLMError(f"cannot load the processor from {path}: {type(e).__name__}",
                        "the checkpoint directory needs its tokenizer and processor files") from None
    if device_map is None:
        model = model.to(device)
    return model.eval(), processor


def check_quant_config(model, qcfg) -> None:
    """Model-specific refusals of a quantization config (smol: its decoder's source weight grid), QVLMError."""
    if getattr(model, "name_or_path", "") == "smol":
        smol.check_quant_config(qcfg)


def record(name_or_path: str) -> dict:
    """The build record beside a shipped model (data/<name>/testbed.json: recipe, training time, measured numbers);
    {} for a checkpoint without one."""
    base = {"tiny": TINY_DIR, "smol": smol.SMOL_DIR}.get(name_or_path, Path(name_or_path))
    f = base / "testbed.json"
    return json.loads(f.read_text()) if f.is_file() else {}
