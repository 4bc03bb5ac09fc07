"""`fold`: every norm's gain (and bias) folded into the linears that read it -- an exact, FP-preserving rewrite,
and the base of the other transforms.

For a norm y = g * n(h) + b (LayerNorm: n = standardise; RMSNorm: n = h / rms(h), b = 0) read only by linears W:

    W y + c = (W diag(g)) n(h) + (W b + c)

so after the fold the norm has g = 1, b = 0 and each reading linear has W' = W diag(g), c' = W b + c. The linears'
INPUTS lose the per-channel gain: an outlier channel that a large gain creates (an injected one, or a real one)
moves from the activations into the weight columns, where per-channel weight quantization absorbs it better.
Pairs are found by tracing one batch (which linear reads exactly a norm's output tensor), never from names or
widths; the final LLM norm feeds the lm_head (kept FP and possibly tied to the embeddings) and is left alone.

References: SmoothQuant / QuaRot preprocessing ("fuse the layer norm into the following linear layers").
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import QVLMError


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


@torch.no_grad()
def norm_linear_pairs(model: nn.Module, batch: dict, include_head: bool = False
                      ) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
    """[(norm name, norm, [linears reading exactly its output])] in forward order, traced on one batch of model
    inputs; the lm_head (kept FP) is excluded unless `include_head`."""
    produced, readers, order, handles = {}, {}, [], []
    names = {id(m): n for n, m in model.named_modules()}
    lm_head = model.get_output_embeddings()

    def on_norm(mod, a, y):                    # returns None: a forward hook's return value replaces the output
        produced.setdefault(id(y), (mod, y))

    def on_linear(mod, a):
        readers.setdefault(id(mod), (mod, a[0]))               # keep a[0] alive: ids stay unique

    for _, m in model.named_modules():
        if is_norm(m) and getattr(m, "weight", None) is not None:
            handles.append(m.register_forward_hook(on_norm))
        elif isinstance(m, nn.Linear) and (include_head or m is not lm_head):
            handles.append(m.register_forward_pre_hook(on_linear))
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    by_norm = {}
    for lin, x in readers.values():
        if id(x) in produced and produced[id(x)][1] is x:
            norm = produced[id(x)][0]
            if id(norm) not in by_norm:
                order.append(norm)
            by_norm.setdefault(id(norm), []).append(lin)
    return [(names[id(n)], n, by_norm[id(n)]) for n in order]


@torch.no_grad()
def fold_norms(model: nn.Module, batch: dict) -> list[dict]:
    """Fold every traced norm's gain and bias into its reading linears, IN PLACE (module docstring). Returns one
    row per norm: name, kind, number of linears, the largest |gain| folded."""
    rows = []
    for name, norm, lins in norm_linear_pairs(model, batch):
        g = norm.weight.detach().float()
        b = getattr(norm, "bias", None)
        for lin in lins:
            w = lin.weight.float()                                       # (out, in)
            if b is not None:
                extra = w @ b.float()                                   # (out,) W b
                if lin.bias is None:
                    lin.bias = nn.Parameter(extra.to(lin.weight.dtype), requires_grad=False)
                else:
                    lin.bias.copy_((lin.bias.float() + extra).to(lin.bias.dtype))
            lin.weight.copy_((w * g[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)
        if b is not None:
            b.zero_()
        rows.append(dict(norm=name, kind=type(norm).__name__, n_linears=len(lins), max_gain=float(g.abs().max())))
    if not rows:
        raise QVLMError("no norm -> linear pairs found to fold", "fold applies to LLaVA-architecture models")
    return rows
