"""Equivalence transforms: rewrites of the FP model that keep its function and change what quantization sees.

    smoothing    per-channel scale migration (X / s, W * s) with the op that absorbs 1/s: SmoothQuant's and AWQ's
"""
from __future__ import annotations

from torch import nn

from ..config import CalibConfig
from ..errors import QVLMError

TRANSFORMS = ("none",)


def apply(model: nn.Module, processor, name: str = "none", calib: CalibConfig | None = None,
          dataset: str = "tiny") -> dict:
    """Apply the transform `name` to the FP `model` IN PLACE (before any method); returns its record."""
    if name not in TRANSFORMS:
        raise QVLMError(f"unknown transform {name!r}", f"use one of {', '.join(TRANSFORMS)}")
    return {"name": name}
