"""`rtn`: round-to-nearest, the baseline every other method must beat.

Weights: each per-channel / per-group step size comes from the weight's own min/max (`qvlm.quant.weight_qparams`),
then every weight is rounded to the nearest grid point (`qvlm.quant.fake_quant_weight`). Activations: dynamic
per-token ranges (no data needed) or, with a_granularity "tensor", one static min/max range per layer observed
by the calibration driver (`qvlm.calib.observe_act_ranges`). This is also the starting point of every learned
method (AdaRound / BRECQ initialise their rounding at RTN), so "lower than RTN" is their test.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass(frozen=True)
class RTNConfig:
    """No knobs: RTN is defined by the QuantConfig alone."""


def quantize_unit(data, qcfg, cfg) -> dict:
    """Nothing to search: the QuantLinears already hold RTN step sizes; the driver calibrates static ranges."""
    return {}


METHOD = Method("rtn", RTNConfig, quantize_unit, needs_data=False,
                summary="round-to-nearest weights; dynamic (or min/max-calibrated static) activations")
