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


def row_fields(stats: dict) -> dict:
    """Scalars of a Q-VLM run for a result row: blocks, steps, and what VEO did (when it ran)."""
    out = dict(n_blocks=stats.get("n_blocks"), steps=stats.get("steps"))
    v = stats.get("veo")
    if v:
        tok = "image" if "H_image_before" in v else "all"
        out.update(veo_reverted=v.get("reverted"), veo_H_before=v.get(f"H_{tok}_before"),
                   veo_H_after=v.get(f"H_{tok}_after"), veo_fp_val_before=v.get("fp_val_before"),
                   veo_fp_val_after=v.get("fp_val_after"))
    return out


METHOD = Method("qvlm", QVLMConfig, None, needs_data=True, run=run, row_fields=row_fields,
                summary="Q-VLM: entropy-guided block partition + visual-encoder optimization + block-wise learned "
                        "rounding and activation steps")
