"""`smoothquant`: SmoothQuant (Xiao et al., ICML 2023, §4 Eq. 4), then round-to-nearest.

Activations have a few outlier channels that make per-token / per-tensor activation quantization coarse; weights
do not. SmoothQuant moves part of the activation range into the weights with a per-input-channel scale

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)          (alpha = migration strength)

applied as X / s and W * s (exact in FP). The 1/s is folded into the op that produces X where possible (the
preceding LayerNorm/RMSNorm, or v_proj / up_proj for o_proj / down_proj), else kept as an explicit input scale
of the QuantLinear (see qvlm.methods.smoothing). max|X_j| comes from the calibration inputs of the unit along the
quantized path. Every linear is smoothed (the paper smooths only the LayerNorm-fed ones; for A4 and the vision /
projector layers the others matter too).

Reference: mit-han-lab/smoothquant `smooth.py::smooth_ln_fcs`, `calibration.py::get_act_scales`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method
from ..transforms.smoothing import apply_scale, find_groups, weight_absmax


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5                 # migration strength; the paper's default (0.75-0.85 for some LLMs)
    unfoldable: str = "input_scale"    # layers with no foldable producer: "input_scale" (explicit) | "skip"


@torch.no_grad()
def smooth_scales(group, alpha: float) -> torch.Tensor:
    """(C,) SmoothQuant scales of one group (clamped away from 0 like the reference)."""
    act = group.act_absmax.clamp(min=1e-5)
    w = weight_absmax(group).clamp(min=1e-5)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def quantize_unit(data, qcfg, cfg: SmoothQuantConfig) -> dict:
    """Smooth every group of the unit, then leave RTN step sizes (recomputed from the smoothed weights)."""
    stats = {}
    for g in find_groups(data, cfg.unfoldable):
        s = smooth_scales(g, cfg.alpha)
        apply_scale(g, s)
        stats[g.key] = dict(fold=g.prev_kind, s_max=float(s.max()), s_min=float(s.min()))
    return stats


METHOD = Method("smoothquant", SmoothQuantConfig, quantize_unit, needs_data=True,
                summary="SmoothQuant alpha-migration (folded into norms / linears), then RTN")
