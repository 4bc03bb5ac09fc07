"""`smooth`: SmoothQuant's migration (Xiao et al., ICML 2023, Eq. 4) as a standalone transform of the FP model --
fold, then per-channel scales between every norm and the linears that read it, folded into the norm.

For a norm whose output X is read by linears W_1..W_k (q|k|v, gate|up, a vision tower's fc1, ...):

    s_j = max|X_j|^alpha / max_i max|W_i[:, j]|^(1 - alpha),     norm gain / bias -> gain / s, bias / s,  W_i -> W_i diag(s)

exact in FP (the norm's affine part is a per-channel multiply; tests/unit/test_smooth.py checks the logits). Only
norm-fed groups are smoothed: their 1/s costs nothing at run time. (o_proj / down_proj have no norm before them;
the `smoothquant` method smooths those per unit with an up -> down fold or an explicit input scale.)

alpha is searched per group on the CALIBRATION data (never val / test), over ALPHAS, minimising the output error of
the group's linears quantized with the run's setting by round-to-nearest,

    sum_i || Q_a(X / s) Q_w(W_i diag(s))^T - X W_i^T ||^2       on up to MAX_TOKENS calibration tokens,

so the migration strength suits W4A4 and W8A8 alike; s = 1 (no migration, alpha recorded as None) is a candidate too,
so on this error the transform never does worse than `fold`. Without a quantized setting alpha = DEFAULT_ALPHA (the
paper's 0.5). The chosen alpha per group is recorded.

Reference: mit-han-lab/smoothquant `smooth.py::smooth_ln_fcs`, `calibration.py::get_act_scales`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..core import quant
from .fold import fold_norms, norm_linear_pairs

ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8)       # searched, beside s = 1 (no migration: never worse than fold on its error)
DEFAULT_ALPHA = 0.5
MAX_TOKENS = 512                             # calibration tokens per group for the alpha search (a seeded subset)


@torch.no_grad()
def _group_stats(model: nn.Module, batches: list[dict], firsts: list[nn.Linear], seed: int
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{id(first linear): ((C,) max |x_j| over every valid calibration token, (<= MAX_TOKENS, C) a seeded random
    subset of the tokens, the same share from each batch)} -- padding tokens dropped."""
    absmax: dict[int, torch.Tensor] = {}
    subset: dict[int, list] = {id(m): [] for m in firsts}
    per_batch = -(-MAX_TOKENS // len(batches))
    gen = torch.Generator().manual_seed(int(seed))
    cur = {}

    def hook(mod, a):
        x = a[0]
        mask = cur.get("mask")
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            x = x[mask.bool()]
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.abs().amax(0)
        absmax[id(mod)] = m if id(mod) not in absmax else torch.maximum(absmax[id(mod)], m)
        keep = torch.randperm(x.shape[0], generator=gen)[:per_batch].sort().values
        subset[id(mod)].append(x[keep.to(x.device)])

    handles = [m.register_forward_pre_hook(hook) for m in firsts]
    try:
        for b in batches:
            cur["mask"] = b.get("attention_mask")
            model(**b)
    finally:
        for h in handles:
            h.remove()
    return {k: (absmax[k], torch.cat(v)[:MAX_TOKENS]) for k, v in subset.items() if v}


def _scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    return (x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def _error(x: torch.Tensor, lins: list[nn.Linear], s: torch.Tensor, qcfg: QuantConfig) -> float:
    """sum_i ||Q_a(X / s) Q_w(W_i s)^T - X W_i^T||^2 (RTN at qcfg's setting)."""
    xq = quant.fake_quant_act(x / s, qcfg.a_bits, qcfg.a_symmetric, "token")
    err = 0.0
    for lin in lins:
        w = lin.weight.float()
        wq = quant.fake_quant_weight(w * s[None, :], qcfg.w_bits, qcfg.group_size, qcfg.w_symmetric)
        err += float((xq @ wq.T - x @ w.T).pow(2).sum())
    return err


@torch.no_grad()
def smooth_norms(model: nn.Module, batches: list[dict], qcfg: QuantConfig | None = None, seed: int = 0) -> dict:
    """Fold the norms, then smooth every norm -> readers group IN PLACE (module docstring). `batches`: model inputs
    of calibration samples (the first also traces the groups). Returns the record (alpha per group)."""
    fold_norms(model, batches[0])
    groups = norm_linear_pairs(model, batches[0])
    stats = _group_stats(model, batches, [lins[0] for _, _, lins in groups], seed)
    search = qcfg is not None and (qcfg.w_bits < quant.FP_BITS or qcfg.a_bits < quant.FP_BITS)
    chosen = {}
    for name, norm, lins in groups:
        x_absmax, sub = stats[id(lins[0])]
        w_absmax = torch.stack([lin.weight.float().abs().amax(0) for lin in lins]).amax(0)
        alpha = DEFAULT_ALPHA
        if search:
            errs = {a: _error(sub, lins, _scales(x_absmax, w_absmax, a), qcfg) for a in ALPHAS}
            errs[None] = _error(sub, lins, torch.ones_like(x_absmax), qcfg)
            alpha = min(errs, key=errs.get)
        chosen[name] = alpha
        if alpha is None:                                    # no migration helps this group
            continue
        s = _scales(x_absmax, w_absmax, alpha)
        norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
        for lin in lins:
            lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))
    return dict(n_groups=len(groups), searched=search, alpha=chosen)
