"""`fp`: the full-precision reference. Nothing is quantized; the model is returned unchanged.

It goes through the same `quantize()` / save / load / eval path as every method, so tables have an FP row
computed by the same code (and so `qvlm quantize --method fp` checks the plumbing).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass(frozen=True)
class FPConfig:
    """No knobs."""


METHOD = Method("fp", FPConfig, None, needs_data=False, summary="full precision: nothing quantized (the reference)")
