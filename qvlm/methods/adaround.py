"""`adaround`: AdaRound (Nagel et al., ICML 2020) -- learned rounding, one linear layer at a time.

Instead of rounding every weight to the nearest grid point, AdaRound learns for each weight whether to round up
or down (a soft offset h(alpha) in [0, 1], annealed to {0, 1} by a regulariser) so that the LAYER'S OUTPUT is
reconstructed. Here the layer's input comes from the quantized path (earlier layers and blocks already
quantized, activations fake-quantized by the layer itself) and the target is the FP layer's output on the FP
path ("asymmetric reconstruction", AdaRound §5 / QDrop), with activation quantization in the loop. The layers
of a unit are learned in forward order; each is frozen before the next one's inputs are captured.
`drop_prob > 0` gives QDrop-style random activation-quantization drop while learning.

The optimisation itself is `qvlm.methods.reconstruct.reconstruct` (shared with BRECQ and Q-VLM).
Reference: yhhhli/BRECQ `quant/layer_recon.py`, Qualcomm AIMET AdaRound.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import QVLMError
from .base import Method
from ..core.reconstruct import ReconConfig, allocate_steps, reconstruct


@dataclass(frozen=True)
class AdaRoundConfig(ReconConfig):
    """ReconConfig's defaults (rounding only; learn_act False; drop_prob 0 = plain AdaRound, 0.5 = QDrop)."""


def quantize_unit(data, qcfg, cfg: AdaRoundConfig) -> dict:
    """Layer-wise learned rounding for every linear of the unit, in forward order."""
    if qcfg.weight_format != "int":
        raise QVLMError("adaround supports weight_format 'int' only", "use --method rtn for NF4 weights")
    stats, qls = {}, data.qlinears()
    steps = allocate_steps(data.iters, [1] * len(qls)) if data.iters is not None else [cfg.iters] * len(qls)
    for (key, ql), n in zip(qls, steps):
        x_q = data.module_inputs(ql)                                  # quantized path, earlier layers frozen
        fp_lin = data.fp_twin(key)
        with torch.no_grad():
            y_fp = [fp_lin(x) for x in data.module_inputs(fp_lin, fp=True)]
        stats[key] = reconstruct([ql], lambda x, i, ql=ql: ql(x), x_q, y_fp, data.masks, replace(cfg, iters=n),
                                 desc=key)
        ql.freeze()
    return stats


METHOD = Method("adaround", AdaRoundConfig, quantize_unit, needs_data=True,
                summary="AdaRound: learned rounding per layer, activation quantization in the loop (QDrop option)",
                group="linear")
