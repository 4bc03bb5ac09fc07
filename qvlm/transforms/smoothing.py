"""Per-channel scale migration shared by SmoothQuant and AWQ: which op absorbs 1/s, statistics, applying s.

For the linears that read the same input X (in_features C), a per-input-channel scale s (C,) gives the same
FP function

    y = W X = (W diag(s)) (diag(s)^-1 X)

if the op producing X absorbs the 1/s:
  norm    X = LayerNorm/RMSNorm(h):  divide the norm's weight (and bias) by s       (input_layernorm -> q, k, v)
  linear  X = v_proj(h) feeding o_proj through attention, or up_proj(h) * act(gate_proj(h)) feeding down_proj:
          divide that linear's output rows (and bias) by s     (v -> o for multi-head attention only; up -> down)
  none    otherwise (after GELU, the projector's input, o_proj under GQA): the QuantLinear keeps an explicit
          `input_scale` and divides its input at run time (a per-channel multiply a kernel would fuse into the
          activation quantizer). `unfoldable="skip"` leaves such layers unsmoothed instead.

Groups are found by TRACING one calibration batch through the unit (which tensor object each linear reads, and
which norm produced it), not from hard-coded widths; the two linear->linear folds are recognised by the llava-hf
module names (v_proj/o_proj/out_proj, up_proj/down_proj) and checked for matching shapes.

References: SmoothQuant `smooth.py::smooth_ln_fcs`; llm-awq `auto_scale.py::scale_ln_fcs, scale_fc_fc`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.hadamard import rotate_input
from ..core.qlinear import QuantLinear

_V_TO_O = (("v_proj", "o_proj"), ("v_proj", "out_proj"))
_UP_TO_DOWN = (("up_proj", "down_proj"),)


@dataclass
class SmoothGroup:
    linears: list                  # [(key, QuantLinear)] reading the same input, forward order
    prev: nn.Module | None         # the op that absorbs 1/s (norm or linear), or None
    prev_kind: str                 # "norm" | "linear" | "none"
    act_absmax: torch.Tensor = None    # (C,) max |x| per input channel over calibration tokens
    act_absmean: torch.Tensor = None   # (C,) mean |x| per input channel
    n_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "+".join(k for k, _ in self.linears)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


def _fold_partner(module_names: dict, ql: QuantLinear, qls_by_name: dict):
    """The QuantLinear whose output rows can absorb 1/s for `ql` (v -> o under MHA, up -> down), else None."""
    if ql.input_transform is not None:              # the partner writes the input BEFORE the online rotation
        return None
    name = module_names[id(ql)]
    parent, _, short = name.rpartition(".")
    for src, dst in _V_TO_O + _UP_TO_DOWN:
        if short == dst:
            partner = qls_by_name.get(f"{parent}.{src}" if parent else src)
            if partner is not None and partner.out_features == ql.in_features:
                return partner
    return None


@torch.no_grad()
def find_groups(data, unfoldable: str = "input_scale") -> list[SmoothGroup]:
    """Smoothing groups of a calibration unit (qvlm.calib.BlockData) in forward order, with activation stats."""
    qls = data.qlinears()
    norm_of_output, first_input, absmax, abssum, count = {}, {}, {}, {}, {}
    handles = []
    cur_mask = [None]

    def norm_hook(mod, _inp, out):
        norm_of_output[id(out)] = (mod, out)            # keep `out` alive so its id stays unique

    def lin_hook(mod, args):
        x = args[0]
        if id(mod) not in first_input:
            first_input[id(mod)] = x
        x = rotate_input(x, mod.input_transform)        # what the weight multiplies (an online Hadamard first)
        mask = cur_mask[0]
        xs = x[mask] if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) else x.reshape(-1, x.shape[-1])
        xs = xs.float().abs()
        absmax[id(mod)] = torch.maximum(absmax[id(mod)], xs.amax(0)) if id(mod) in absmax else xs.amax(0)
        abssum[id(mod)] = abssum.get(id(mod), 0) + xs.sum(0)
        count[id(mod)] = count.get(id(mod), 0) + xs.shape[0]

    for blk in data.modules:
        for m in blk.modules():
            if _is_norm(m):
                handles.append(m.register_forward_hook(norm_hook))
    for _, m in qls:
        handles.append(m.register_forward_pre_hook(lin_hook))
    enabled = {id(m): m.quant_enabled for _, m in qls}
    try:
        for _, m in qls:
            m.quant_enabled = False                     # statistics of the FP function (smoothing is exact in FP)
        for i in range(len(data)):
            cur_mask[0] = data.masks[i]
            data.forward(i)
            if i == 0:                                   # the grouping comes from the first batch
                seen_norms = dict(norm_of_output)
            norm_of_output.clear()
    finally:
        for h in handles:
            h.remove()
        for _, m in qls:
            m.quant_enabled = enabled[id(m)]
    names = {}                                           # "j.self_attn.v_proj": unique across the unit's blocks
    for j, blk in enumerate(data.modules):
        names.update({id(m): f"{j}.{n}" for n, m in blk.named_modules()})
    qls_by_name = {names[id(m)]: m for _, m in qls if id(m) in names}
    groups, done = [], set()
    for k, m in qls:
        if id(m) in done or id(m) not in first_input:
            continue
        x = first_input[id(m)]
        members = [(k2, m2) for k2, m2 in qls if id(m2) not in done and first_input.get(id(m2)) is x]
        done.update(id(m2) for _, m2 in members)
        norm = seen_norms.get(id(x))
        if norm is not None:
            prev, kind = norm[0], "norm"
        else:
            partner = _fold_partner(names, m, qls_by_name) if len(members) == 1 else None
            prev, kind = (partner, "linear") if partner is not None else (None, "none")
        if kind == "none" and unfoldable == "skip":
            continue
        g = SmoothGroup(members, prev, kind, absmax[id(m)], abssum[id(m)] / count[id(m)], count[id(m)])
        groups.append(g)
    first_input.clear()
    return groups


def weight_absmax(group: SmoothGroup) -> torch.Tensor:
    """(C,) max |W| per input channel over all linears of the group."""
    return torch.stack([m.weight.float().abs().amax(0) for _, m in group.linears]).amax(0)


def snapshot(group: SmoothGroup) -> dict:
    """Copies of every tensor apply_scale touches (so a search can try a scale and restore)."""
    snap = {}
    for _, m in group.linears:
        snap[id(m)] = (m.weight.data.clone(), None if m.input_scale is None else m.input_scale.clone())
    if group.prev is not None:
        p = group.prev
        snap["prev"] = (p.weight.data.clone(), None if getattr(p, "bias", None) is None else p.bias.data.clone())
    return snap


@torch.no_grad()
def restore(group: SmoothGroup, snap: dict) -> None:
    for _, m in group.linears:
        w, s = snap[id(m)]
        m.weight.data.copy_(w)
        m.set_tensor("input_scale", s)
        m.reset_weight_qparams()
    if group.prev is not None:
        w, b = snap["prev"]
        group.prev.weight.data.copy_(w)
        if b is not None:
            group.prev.bias.data.copy_(b)
        if isinstance(group.prev, QuantLinear):
            group.prev.reset_weight_qparams()


@torch.no_grad()
def apply_scale(group: SmoothGroup, s: torch.Tensor) -> None:
    """Migrate the per-channel scale s (C,): the producer of X absorbs 1/s, the group's weights absorb s.

    The RTN step sizes of every touched QuantLinear are recomputed from the new weights."""
    s = s.float()
    if group.prev_kind == "norm":
        p = group.prev
        p.weight.data = (p.weight.float() / s).to(p.weight.dtype)
        if getattr(p, "bias", None) is not None:
            p.bias.data = (p.bias.float() / s).to(p.bias.dtype)
    elif group.prev_kind == "linear":
        p = group.prev
        p.weight.data = (p.weight.float() / s[:, None]).to(p.weight.dtype)          # output rows
        if p.bias is not None:
            p.bias.data = (p.bias.float() / s).to(p.bias.dtype)
        p.reset_weight_qparams()
    for _, m in group.linears:
        if group.prev_kind == "none":
            old = m.input_scale.float() if m.input_scale is not None else torch.ones_like(s)
            m.set_tensor("input_scale", old * s)          # fp32
        m.weight.data = (m.weight.float() * s[None, :]).to(m.weight.dtype)          # input columns
        m.reset_weight_qparams()
