"""Equivalence transforms: rewrites of the FP model that keep its function and change what quantization sees.
Applied to the FP model before any method (`qvlm.experiments.run_one(transform=...)`, `--transform`).

    fold         every norm's gain and bias folded into the linears that read it (exact; the base of the others)
    rotate       fold, then a seeded Hadamard rotation of the LLM residual stream fused into the weights (QuaRot)
    smoothing    per-channel scale migration (X / s, W * s) with the op that absorbs 1/s: SmoothQuant's and AWQ's
                 (used inside those methods, per layer, on calibration statistics)

Each transform is checked to keep the FP logits (tests/unit/test_fold.py, tests/unit/test_rotate.py).
"""
from __future__ import annotations

from torch import nn

from ..config import CalibConfig
from ..core.hooks import calib_batches, model_inputs
from ..data import calibration_set
from ..errors import QVLMError
from . import fold, rotate

TRANSFORMS = ("none", "fold", "rotate")
TRACE_SAMPLES = 4                  # calibration samples used to trace which linears read which norm


def apply(model: nn.Module, processor, name: str = "none", calib: CalibConfig | None = None,
          dataset: str = "tiny") -> dict:
    """Apply the transform `name` to the FP `model` IN PLACE (before any method); returns its record."""
    if name not in TRANSFORMS:
        raise QVLMError(f"unknown transform {name!r}", f"use one of {', '.join(TRANSFORMS)}")
    if name == "none":
        return {"name": name}
    calib = calib or CalibConfig()
    samples = calibration_set(dataset, TRACE_SAMPLES, calib.seed)
    batch = model_inputs(model, calib_batches(samples, processor, TRACE_SAMPLES)[0])
    if name == "rotate":                                   # seeded by the calibration seed (recorded)
        return {"name": name, **rotate.rotate_residual(model, batch, seed=calib.seed)}
    rows = fold.fold_norms(model, batch)
    return {"name": name, "n_norms": len(rows), "max_gain": max(r["max_gain"] for r in rows)}
