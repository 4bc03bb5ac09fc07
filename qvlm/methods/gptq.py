"""`gptq`: GPTQ (Frantar et al., ICLR 2023, Algorithm 1), with activation quantization on top for WxAy.

For one linear with calibration inputs X (n tokens, C) GPTQ minimises ||W X^T - Q X^T||^2 over grid weights Q,
column by column: quantize column j, then spread its error over the not-yet-quantized columns with the inverse
Hessian H^-1, H = 2 X^T X / n (+ damping), in Cholesky form and lazy blocks of `block_size` columns.

In the harness: the sequential driver gives each unit its quantized-path inputs; inside a unit the linears are
processed in forward order, in groups that read the same tensor (q/k/v, gate/up), each group's H collected
from a fresh pass with the earlier groups already quantized ("true sequential"). The input statistics include
the layer's own activation quantization (X is the fake-quantized input), so the weights are fitted to the
activations they will see. Per-group step sizes are chosen lazily from the updated weights at each group start
(as the reference does) unless `act_order`, where they are fixed up front ("static groups").

Reference: IST-DASLab/gptq `gptq.py::GPTQ.fasterquant`, `llama.py::llama_sequential`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..core import quant
from ..core.calib import observe_act_ranges
from ..errors import QVLMError
from .base import Method


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01      # damping added to diag(H), as a fraction of its mean (reference default)
    block_size: int = 128       # columns per lazy-update block (speed only; same result)
    act_order: bool = False     # quantize columns in decreasing diag(H) order ("desc_act"); static group qparams


def hessian_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer-output error GPTQ minimises (= ||W X^T - Q X^T||^2 * 2 / n)."""
    d = (w - q).float()
    return float(torch.einsum("oi,ij,oj->", d, h, d))


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
                         percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
                         w_clip: str = "minmax"):
    """GPTQ on one weight (out, C) with Hessian h (C, C). Returns (Q on the grid (out, C), scale, zero_point)
    with scale / zero_point shaped (out, n_groups) like qvlm.quant.weight_qparams."""
    out_f, cols = w.shape
    g = group_size or cols
    quant.check_group_size(g, cols)
    W = w.detach().float().clone()                                              # (out, C)
    H = h.detach().float().clone()                                              # (C, C)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero_point = quant.weight_qparams(W, bits, group_size, symmetric, w_clip=w_clip)    # (out, n_groups)
    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)      # upper Cholesky of H^-1
    except RuntimeError:
        raise QVLMError("GPTQ: the layer's Hessian is not positive definite",
                        "raise percdamp (e.g. percdamp=0.1)") from None
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2], Hinv[i1:i2, i1:i2]                             # W1 is a view: updates land in W
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col])
            if group_size and not act_order and orig % g == 0:                  # lazy group params from updated W
                scale[:, orig // g], zero_point[:, orig // g] = [t[:, 0] for t in quant.weight_qparams(
                    W[:, col:col + g], bits, 0, symmetric, w_clip=w_clip)]
            s, z = scale[:, orig // g], zero_point[:, orig // g]                # (out,)
            wc = W1[:, i]
            qc = quant.fake_quant(wc, s, z, bits, symmetric)
            Q[:, col] = qc
            err = (wc - qc) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale, zero_point


@contextlib.contextmanager
def _collect_hessians(layers, mask_ref):
    """Accumulate H = 2/n sum x x^T of each layer's (smoothed, activation-quantized) input over valid tokens;
    also record the first input tensor object each layer sees (to group layers reading the same tensor)."""
    acc = {id(m): [0, 0, None] for m in layers}                                 # [H sum, n, first input]

    def hook(mod, args):
        x = args[0]
        if acc[id(mod)][2] is None:
            acc[id(mod)][2] = x
        x = mod.quant_input(mod.prepare_input(x))
        mask = mask_ref[0]
        xs = x[mask] if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) else x.reshape(-1, x.shape[-1])
        xs = xs.float()                                                          # (n, C)
        acc[id(mod)][0] = acc[id(mod)][0] + xs.T @ xs
        acc[id(mod)][1] += xs.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


def quantize_unit(data, qcfg, cfg: GPTQConfig) -> dict:
    """GPTQ every linear of the unit, true-sequentially in groups that share an input."""
    if qcfg.weight_format != "int":
        raise QVLMError("gptq supports weight_format 'int' only", "use --method rtn for NF4 weights")
    observe_act_ranges(data)                 # static activation ranges first: H is built from the quantized inputs
    stats = {}
    pending = [(k, m) for k, m in data.qlinears() if m.quantizes_weight]
    mask_ref = [None]
    while pending:
        with torch.no_grad(), _collect_hessians([m for _, m in pending], mask_ref) as acc:
            for i in range(len(data)):
                mask_ref[0] = data.masks[i]
                data.forward(i)
        first = acc[id(pending[0][1])][2]
        group = [(k, m) for k, m in pending if acc[id(m)][2] is first]
        for k, m in group:
            h_sum, n, _ = acc[id(m)]
            H = 2 * h_sum / max(n, 1)
            w = m.weight.data
            rtn = quant.fake_quant_weight(w.float(), m.w_bits, m.group_size, m.w_symmetric,
                                          *quant.weight_qparams(w, m.w_bits, m.group_size, m.w_symmetric,
                                                                w_clip=m.w_clip))
            q, scale, zero_point = gptq_quantize_weight(w, H, m.w_bits, m.group_size, m.w_symmetric,
                                                        cfg.percdamp, cfg.block_size, cfg.act_order, m.w_clip)
            stats[k] = dict(loss_rtn=hessian_error(w, rtn, H), loss=hessian_error(w, q, H))
            m.weight.data = q.to(w.dtype)
            m.w_scale, m.w_zero_point = scale, zero_point
            m.freeze()                         # on the grid now: later groups see the quantized layer
        done = {id(m) for _, m in group}
        pending = [(k, m) for k, m in pending if id(m) not in done]
    return stats


METHOD = Method("gptq", GPTQConfig, quantize_unit, needs_data=True,
                summary="GPTQ Hessian-aware sequential weight rounding (+ activation quantization)")
