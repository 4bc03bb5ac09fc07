"""Load any model directory this repo reads or writes, by what it holds:

    qvlm.loading.load("tiny")                      a shipped FP testbed            -> qvlm.models.load
    qvlm.loading.load("/models/llava-1.5-7b-hf")   a llava-hf FP checkpoint        -> qvlm.models.load
    qvlm.loading.load("runs/w4a4")                 a `qvlm quantize` output        -> qvlm.core.checkpoint.load_quantized
    qvlm.loading.load("runs/w4a4-packed")          a `qvlm deploy` output          -> qvlm.deploy.checkpoint.load_packed
    qvlm.loading.load("runs/w4-ct")                a `qvlm export` output          -> qvlm.deploy.export.load_export
"""
from __future__ import annotations

from pathlib import Path

from . import models
from .core.checkpoint import QUANT_META, load_quantized
from .deploy.checkpoint import PACKED_META, load_packed
from .deploy.export import EXPORT_META, load_export


def load(name_or_path: str, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) in eval mode, dispatched on the directory's marker file (module docstring)."""
    if name_or_path not in models.SHIPPED:
        path = Path(name_or_path)
        if (path / QUANT_META).is_file():
            return load_quantized(path, device=device, dtype=dtype)
        if (path / PACKED_META).is_file():
            return load_packed(path, device=device, dtype=dtype)
        if (path / EXPORT_META).is_file():
            return load_export(path, device=device)
    return models.load(name_or_path, device=device, dtype=dtype)
