"""Equivalence transforms: rewrites of the FP model that keep its function and change what quantization sees.
Applied to the FP model before any method (`qvlm.experiments.run_one(transform=...)`, `--transform`).

    fold         every norm's gain and bias folded into the linears that read it (exact; the base of the others)
    smooth       fold, then SmoothQuant scales between every norm and its readers, folded into the norm (alpha
                 searched per group on calibration data for the run's setting)
    rotate       fold, then a seeded Hadamard rotation of the LLM residual stream fused into the weights, plus an
                 online Hadamard on every down_proj input (QuaRot)
    smoothing    per-channel scale migration (X / s, W * s) with the op that absorbs 1/s: SmoothQuant's and AWQ's
                 (used inside those methods, per layer, on calibration statistics)

Each transform is checked to keep the FP logits (tests/unit/test_fold.py, test_smooth.py, test_rotate.py).
"""
from __future__ import annotations

from torch import nn

from ..config import CalibConfig, QuantConfig
from ..core.hooks import calib_batches, model_inputs
from ..data import calibration_set
from ..errors import QVLMError
from . import fold, rotate, smooth

TRANSFORMS = ("none", "fold", "smooth", "rotate")
TRACE_SAMPLES = 4                  # calibration samples used to trace which linears read which norm


def apply(model: nn.Module, processor, name: str = "none", calib: CalibConfig | None = None,
          dataset: str = "tiny", qcfg: QuantConfig | None = None) -> dict:
    """Apply the transform `name` to the FP `model` IN PLACE (before any method); returns its record. `qcfg`: the
    setting the model will be quantized with (smooth searches its alpha for it)."""
    if name not in TRANSFORMS:
        raise QVLMError(f"unknown transform {name!r}", f"use one of {', '.join(TRANSFORMS)}")
    if name == "none":
        return {"name": name}
    calib = calib or CalibConfig()
    samples = calibration_set(dataset, TRACE_SAMPLES, calib.seed)
    batch = model_inputs(model, calib_batches(samples, processor, TRACE_SAMPLES)[0])
    if name == "rotate":                                   # seeded by the calibration seed (recorded)
        return {"name": name, **rotate.rotate_residual(model, batch, seed=calib.seed)}
    if name == "smooth":                                   # statistics of the calibration set (never val / test)
        cal = calibration_set(dataset, calib.n_calib, calib.seed)
        batches = [model_inputs(model, b) for b in calib_batches(cal, processor, calib.batch_size)]
        return {"name": name, **smooth.smooth_norms(model, batches, qcfg, seed=calib.seed)}
    rows = fold.fold_norms(model, batch)
    return {"name": name, "n_norms": len(rows), "max_gain": max(r["max_gain"] for r in rows)}
