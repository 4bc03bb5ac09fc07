"""`qvlm`: Q-VLM (Wang et al., NeurIPS 2024), the paper's method, registered in the harness.

The pipeline itself (visual-encoder optimization, entropy profile, partition, block-wise rounding search) lives in
`qvlm.method` (one module per paper step; `qvlm.method.pipeline.run_qvlm` chains them); this module only adapts it
to the `Method` interface every baseline uses, so Q-VLM is run, timed and evaluated exactly like them.
"""
from __future__ import annotations

from ..method.pipeline import QVLMConfig, run_qvlm
from .base import Method


def run(model, processor, samples, qcfg, calib_cfg, cfg: QVLMConfig, progress: bool = True,
        dataset: str = "tiny") -> dict:
    """`Method.run` hook for qvlm.methods.quantize: the whole pipeline; returns the JSON-able summary."""
    res = run_qvlm(model, processor, samples, qcfg, cfg, batch_size=calib_cfg.batch_size, seed=calib_cfg.seed,
                   dataset=dataset, progress=progress)
    return res.stats()


METHOD = Method("qvlm", QVLMConfig, None, needs_data=True, run=run,
                summary="Q-VLM: entropy-guided block partition + visual-encoder optimization + block-wise learned "
                        "rounding and activation steps")
