"""`quarot`: QuaRot (Ashkboos et al., NeurIPS 2024) as its paper describes the W4A4 recipe -- rotate, then GPTQ
weights and round-to-nearest per-token activations.

The rotation is the `rotate` transform (qvlm.transforms.rotate: norm gains folded, a seeded random Hadamard Q of
the LLM residual stream fused into the embeddings, the projector's output, every reading / writing linear and the
lm_head); the rounding is this repo's GPTQ unchanged (its knobs: percdamp, block_size, act_order). The run records
the transform (row['transform'] = 'rotate', its seed = the calibration seed).

Paper defaults and what differs here: QuaRot also rotates each attention head (v / o) and applies an online Hadamard
to the down_proj input; both are not implemented yet, so this is the residual-rotation variant (SpinQuant's R1 with
a Hadamard instead of a learned rotation). The vision tower is not rotated (LayerNorm; qvlm.transforms.rotate).
"""
from __future__ import annotations

from . import gptq
from .base import Method

METHOD = Method("quarot", gptq.GPTQConfig, gptq.quantize_unit, needs_data=True, transform="rotate",
                summary="QuaRot: Hadamard rotation of the LLM residual stream, then GPTQ weights + RTN activations")
