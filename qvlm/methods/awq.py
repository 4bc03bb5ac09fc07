"""`awq`: AWQ (Lin et al., MLSys 2024) -- activation-aware per-channel scale search + weight clip search.

1. Scale search (AWQ §3.2, Eq. 5): for each group of linears reading the same input X, try
       s = mean|X|^r  (normalised so sqrt(max(s) * min(s)) = 1),   r in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
   apply it (weights * s, producer of X / s: qvlm.methods.smoothing), and keep the r with the lowest error of
   the UNIT's output against the FP unit on the same (quantized-path) inputs, with only this group quantized.
   r = 0 is s = 1 (plain RTN), so the search never does worse than RTN on its objective. Unlike llm-awq (weight-
   only), the group is evaluated as deployed, i.e. with its activation quantization when a_bits < 16.
2. Clip search (llm-awq `auto_clip.py`): per linear except q/k (their error is judged through attention scores,
   as in the reference), per output channel and group, shrink the weight range max|W| by
   1 - i/n_grid, i < max_shrink * n_grid, minimising the group's output error sum_tokens ((W - Q(W)) x)^2 on
   up to n_clip_tokens calibration tokens (a seeded random subset); the winning range sets (w_scale, w_zero_point).

References: mit-han-lab/llm-awq `awq/quantize/auto_scale.py::auto_scale_block`, `auto_clip.py::auto_clip_layer`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import quant
from ..errors import QVLMError
from .base import Method
from ..core.reconstruct import objective
from ..transforms.smoothing import apply_scale, find_groups, restore, snapshot


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20               # candidates for the scale exponent r, and for the clip shrink (reference)
    clip: bool = True              # run the clip search after the scale search
    max_shrink: float = 0.5        # clip ratios tried: 1 - i / n_grid for i < max_shrink * n_grid (reference)
    n_clip_tokens: int = 512       # tokens for the clip search (random subset, seeded by the calibration seed)
    unfoldable: str = "input_scale"  # groups with no foldable producer: "input_scale" (explicit) | "skip"


def _awq_scales(act_absmean: torch.Tensor, ratio: float) -> torch.Tensor:
    s = act_absmean.clamp(min=1e-4).pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(data, group, qlinears, local_targets, n_grid: int, weights=None) -> dict:
    """Grid-search the AWQ exponent for one group; applies the best scale. Returns dict(ratio, loss, loss_rtn).
    `weights`: optional per-batch (B, T) token weights of the objective (MBQ's modality balance)."""
    others = [m for _, m in qlinears if all(m is not g for _, g in group.linears)]
    for m in others:
        m.quant_enabled = False                     # only this group is quantized while it is searched
    try:
        snap = snapshot(group)
        fwd = lambda x, i: data.forward(i, x)                                     # noqa: E731
        best = (None, float("inf"))
        losses = []
        for k in range(n_grid):
            ratio = k / n_grid
            apply_scale(group, _awq_scales(group.act_absmean, ratio))
            loss = objective(fwd, data.inputs, local_targets, data.masks, weights)
            losses.append(loss)
            if loss < best[1]:
                best = (ratio, loss)
            restore(group, snap)
        apply_scale(group, _awq_scales(group.act_absmean, best[0]))
    finally:
        for m in others:
            m.quant_enabled = True
    return dict(ratio=best[0], loss=best[1], loss_rtn=losses[0], fold=group.prev_kind)


@torch.no_grad()
def search_clip(ql, x: torch.Tensor, n_grid: int, max_shrink: float) -> torch.Tensor:
    """Best clip ratio (out, n_groups) for one linear given its inputs x (n, C) (already smoothed).
    Sets the layer's step sizes to it and returns it."""
    w = ql.weight.float()
    out_f, in_f = w.shape
    g = ql.group_size or in_f
    wg = w.reshape(out_f, in_f // g, g)                                             # (out, n_groups, g)
    xg = x.float().reshape(-1, in_f // g, g)                                        # (n, n_groups, g)
    org = torch.einsum("ogk,ngk->ong", wg, xg)                                      # (out, n, n_groups)
    best_err = torch.full((out_f, in_f // g), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    for i in range(int(max_shrink * n_grid)):
        ratio = 1 - i / n_grid
        scale, zero_point = quant.weight_qparams(w, ql.w_bits, ql.group_size, ql.w_symmetric, ratio)
        wq = quant.fake_quant(wg, scale[..., None], zero_point[..., None], ql.w_bits, ql.w_symmetric)
        err = (torch.einsum("ogk,ngk->ong", wq, xg) - org).pow(2).mean(1)           # (out, n_groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    ql.reset_weight_qparams(clip_ratio=best)
    return best


def quantize_unit(data, qcfg, cfg: AWQConfig, weights=None) -> dict:
    """Scale search for every smoothing group of the unit, then clip search per linear. `weights`: optional
    per-batch (B, T) token weights of the scale search's objective (MBQ, qvlm.methods.mbq)."""
    if qcfg.weight_format != "int":
        raise QVLMError("awq supports weight_format 'int' only", "use --method rtn for NF4 weights")
    stats = {}
    qlinears = data.qlinears()
    local_targets = data.local_targets()
    for group in find_groups(data, cfg.unfoldable):
        stats[group.key] = search_scales(data, group, qlinears, local_targets, cfg.n_grid, weights)
    if cfg.clip and qcfg.w_bits < 16:
        for key, ql in qlinears:
            short = key.rsplit(".", 1)[-1]
            if short in ("q_proj", "k_proj"):
                continue
            xs = []
            for i, x in enumerate(data.module_inputs(ql)):
                x = ql.prepare_input(x)
                valid = tuple(x.shape[:-1]) == tuple(data.masks[i].shape)
                xs.append(data.tokens(i, x) if valid else x.reshape(-1, x.shape[-1]))                 # (n, C)
            x = torch.cat(xs)                                                       # (n_tokens, C)
            if x.shape[0] > cfg.n_clip_tokens:
                keep = torch.randperm(x.shape[0], device=x.device)[: cfg.n_clip_tokens]      # seeded by quantize()
                x = x[keep.sort().values]
            best = search_clip(ql, x, cfg.n_grid, cfg.max_shrink)
            stats.setdefault("clip", {})[key] = float(best.mean())
    return stats


METHOD = Method("awq", AWQConfig, quantize_unit, needs_data=True,
                summary="AWQ: activation-aware per-channel scale search (+ weight clip search)")
