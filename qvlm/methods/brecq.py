"""`brecq`: BRECQ (Li et al., ICLR 2021) -- learned rounding reconstructed jointly per transformer block,
with learned activation step sizes.

BRECQ's observation (its Theorem 3.1) is that the second-order interaction between layers is strong inside a
block and weak across blocks, so rounding is optimised jointly for all layers of a block against the BLOCK's
output: one `reconstruct` call over every QuantLinear of the unit, with the unit's forward (attention masks and
position embeddings passed through), quantized-path inputs, and the FP model's outputs as targets. Activation
step sizes are learned jointly (LSQ for static per-tensor ranges; a clipping ratio for dynamic per-token
ranges). Not implemented: BRECQ's Fisher-information weighting of the output error (plain MSE here).

The unit is whatever the calibration driver hands over: one transformer layer by default. Q-VLM reuses the same
call with its entropy-guided units (qvlm.calib.calibrate(units=...)).
Reference: yhhhli/BRECQ `quant/block_recon.py::block_reconstruction`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import QVLMError
from .base import Method
from ..core.reconstruct import ReconConfig, reconstruct


@dataclass(frozen=True)
class BRECQConfig(ReconConfig):
    learn_act: bool = True       # BRECQ learns the activation step size with the rounding


def quantize_unit(data, qcfg, cfg: BRECQConfig) -> dict:
    """Joint rounding + activation-step reconstruction of the whole unit."""
    if qcfg.weight_format != "int":
        raise QVLMError("brecq supports weight_format 'int' only", "use --method rtn for NF4 weights")
    qls = [m for _, m in data.qlinears()]
    cfg = replace(cfg, iters=data.iters) if data.iters is not None else cfg
    return reconstruct(qls, lambda x, i: data.forward(i, x), data.inputs, data.targets, data.masks, cfg, desc=data.key)


METHOD = Method("brecq", BRECQConfig, quantize_unit, needs_data=True,
                summary="BRECQ: learned rounding + activation steps, reconstructed per transformer block")
