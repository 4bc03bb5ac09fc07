"""`quarot`: QuaRot (Ashkboos et al., NeurIPS 2024) as its paper describes the W4A4 recipe -- rotate, then GPTQ
weights and round-to-nearest per-token activations.

The rotation is the `rotate` transform (qvlm.transforms.rotate: norm gains folded, a seeded random Hadamard Q of
the LLM residual stream fused into the embeddings, the projector's output, every reading / writing linear and the
lm_head, plus QuaRot's online Hadamard on every down_proj input, a run-time FWHT); the rounding is this repo's GPTQ
unchanged (its knobs: percdamp, block_size, act_order), with the Hessian of the rotated down_proj input. The run
records the transform (row['transform'] = 'rotate', its seed = the calibration seed).

Paper defaults and what differs here: QuaRot also rotates each attention head (a Hadamard fused into v / o and an
online one across heads before o_proj, R2 / R3 with the KV cache); not implemented, so o_proj's input is not
rotated. The vision tower is not rotated (LayerNorm; qvlm.transforms.rotate). W4A4 in the paper keeps activations
per-token RTN with a clip ratio of 0.9; here clip 1.0 (the harness's RTN) unless a method learns one. QuaRot's
weight ranges are searched (`--w_clip`): here `--w-clip mse` (QuantConfig.w_clip, for every method alike); on smol,
W4A4, 3 seeds it gave 46.4 +- 2.3 against 44.6 +- 1.9 with min/max ranges (tied; data/smol/README.md).
"""
from __future__ import annotations

from . import gptq
from .base import Method

METHOD = Method("quarot", gptq.GPTQConfig, gptq.quantize_unit, needs_data=True, transform="rotate",
                summary="QuaRot: Hadamard rotation of the LLM residual stream, then GPTQ weights + RTN activations")
