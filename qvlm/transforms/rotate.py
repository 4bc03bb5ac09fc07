"""`rotate`: a QuaRot-style orthogonal rotation of the LLM's residual stream, fused offline into the weights -- an
exact, FP-preserving rewrite that spreads outlier channels over all channels before any method quantizes.

With every RMSNorm gain folded into the linears that read it (`fold`), RMSNorm commutes with an orthogonal Q:
rms(h Q) = rms(h), so RMSNorm(h Q) = RMSNorm(h) Q. Rotating the residual stream h -> h Q then only rewrites weights:

    embeddings      E  -> E Q                  (token rows enter the stream rotated)
    projector out   W  -> Q^T W, b -> b Q      (image tokens enter the stream rotated)
    readers         W  -> W Q                  (q, k, v, gate, up: read RMSNorm(h) Q)
    writers         W  -> Q^T W, b -> b Q      (o_proj, down_proj: add to the stream)
    lm_head         W  -> W diag(g) Q          (reads the final RMSNorm, gain g folded; UNTIED from E if tied)

so the logits are unchanged up to float rounding (tests/unit/test_rotate.py). What changes is what the readers'
activation quantizers see: RMSNorm(h) Q, where one huge channel is spread as +-x/sqrt(d) over all d channels.

Q = diag(s) H / sqrt(d): a Hadamard matrix with random signs (qvlm.core.hadamard, Kronecker construction for
d = 576 = 12 x 12 x 4), seeded (the seed is the calibration seed, recorded); `kind="orthogonal"`: a Haar-random
orthogonal matrix instead (any d).

Found by tracing, not names: readers = linears reading a norm's output inside the LLM layers, the lm_head's norm;
writers = the other linears of an LLM layer whose output width is the stream's width (checked: the FP logits must
not move); the projector's writer = its last linear in forward order.

Online Hadamard on the MLP output projection's input (`online=True`, the default; QuaRot's R4): down_proj reads
act(gate) * up, which no offline rotation reaches, and is the layer with the heaviest-tailed input. Its weight
becomes W H_n / sqrt(n) (a plain Hadamard matrix, no random signs: the run-time op is exactly the FWHT
`qvlm.core.hadamard.fwht`, Kronecker for n = 1536 = 12 x 128) and the layer a `RotatedInputLinear`, which rotates
its input at run time; `QuantLinear` carries the rotation (`input_transform="hadamard"`) so quantizers, GPTQ's
Hessian and the packed kernels all see the rotated input. Found structurally: the last writer of each LLM layer in
forward order (the MLP's output).

The vision tower and the projector (`online=True` too): the vision tower's LayerNorm subtracts the mean, which does
not commute with a residual rotation (SliceGPT's LayerNorm -> RMSNorm conversion would be needed), so instead every
vision and projector linear rotates its own input online (W -> W H / sqrt(n), RotatedInputLinear), the choice the
choice allowed for this transform. Cost: one FWHT per linear input at run time (q / k / v read the same tensor: the
fused deployment, qvlm.deploy.fuse, rotates it once). What it buys per part: `python -m bench.accuracy --scope ...`
(numbers in data/smol/README.md).

Not rotated here (documented limit): the attention heads (QuaRot's per-head Hadamard on v / o). The residual
rotation alone (`online=False`) is SpinQuant's R1.

References: QuaRot (Ashkboos et al. 2024) `rotation_utils.py::rotate_embeddings, rotate_attention_inputs,
rotate_mlp_output, rotate_head`; SpinQuant (Liu et al. 2024) R1.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.hadamard import hadamard_matrix, random_hadamard, random_orthogonal
from ..core.qlinear import RotatedInputLinear, set_module
from ..errors import QVLMError
from ..models import llava
from .fold import fold_norms, is_norm, norm_linear_pairs

KINDS = ("hadamard", "orthogonal")


def _check_rms(norm: nn.Module, name: str) -> None:
    if not type(norm).__name__.endswith("RMSNorm"):
        raise QVLMError(f"rotate needs RMSNorm in the LLM, found {type(norm).__name__} at {name}",
                        "use --transform fold (a LayerNorm does not commute with a rotation)")


@torch.no_grad()
def _rotate_in(lin: nn.Linear, q: torch.Tensor) -> None:           # W -> W Q
    lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))


@torch.no_grad()
def _rotate_out(lin: nn.Linear, q: torch.Tensor) -> None:          # W -> Q^T W, b -> b Q
    lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))


@torch.no_grad()
def _final_norm(model: nn.Module, batch: dict) -> tuple[str, nn.Module] | None:
    """(name, norm) whose output is the language model's last hidden state (what the lm_head reads), traced."""
    produced, seen = {}, {}
    names = {id(m): n for n, m in model.named_modules()}

    def on_norm(mod, a, y):                   # returns None: a hook's return value would replace the output
        produced.setdefault(id(y), (mod, y))

    def on_llm(mod, a, out):
        seen.setdefault("h", out[0] if isinstance(out, tuple) else out.last_hidden_state)

    handles = [m.register_forward_hook(on_norm) for m in model.modules() if is_norm(m)]
    handles.append(llava.parts(model)["llm"].module.register_forward_hook(on_llm))
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    hit = produced.get(id(seen.get("h")))
    return (names[id(hit[0])], hit[0]) if hit is not None and hit[1] is seen["h"] else None


@torch.no_grad()
def rotate_residual(model: nn.Module, batch: dict, seed: int = 0, kind: str = "hadamard", online: bool = True) -> dict:
    """Fold the norms, then rotate the LLM residual stream by Q, IN PLACE (module docstring); with `online`, also
    the MLP output projections' inputs by a run-time Hadamard. Returns its record."""
    if kind not in KINDS:
        raise QVLMError(f"unknown rotation kind {kind!r}", f"use one of {', '.join(KINDS)}")
    fold_norms(model, batch)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    d = emb.weight.shape[1]
    q = random_hadamard(d, seed) if kind == "hadamard" else random_orthogonal(d, seed)
    llm_lins = {id(i.module): i for i in llava.linear_layers(model, ("llm",))}
    readers, head_norm = set(), _final_norm(model, batch)
    for name, norm, lins in norm_linear_pairs(model, batch):
        if any(id(lin) in llm_lins for lin in lins):
            _check_rms(norm, name)
            readers |= {id(lin) for lin in lins if id(lin) in llm_lins}
    if head_norm is None:
        raise QVLMError("rotate: no norm feeding the lm_head was traced", "rotate applies to LLaMA-style decoders")
    _check_rms(head_norm[1], head_norm[0])
    writers = [i.module for i in llm_lins.values() if id(i.module) not in readers and i.module.out_features == d]
    proj = [i.module for i in llava.linear_layers(model, ("projector",))]
    if not proj or proj[-1].out_features != d:
        raise QVLMError("rotate: the projector's last linear does not write the LLM's width",
                        "rotate applies to LLaVA-architecture models")
    g = head_norm[1].weight.double()
    w_head = head.weight.double() * g[None, :]                      # fold the final norm's gain into the head
    tied = llava.tied_embeddings(model)
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    llava.untie_lm_head(model, (w_head @ q).to(emb.weight.dtype))           # untied (or replaced)
    head_norm[1].weight.fill_(1.0)
    for i in llm_lins.values():
        if id(i.module) in readers:
            _rotate_in(i.module, q)
    for lin in writers:
        _rotate_out(lin, q)
    _rotate_out(proj[-1], q)
    n_online = len(rotate_mlp_inputs(model, {id(w) for w in writers})) if online else 0
    n_vision = len(rotate_vision_inputs(model)) if online else 0
    return dict(kind=kind, seed=int(seed), dim=d, n_readers=len(readers), n_writers=len(writers) + 1,
                untied_lm_head=tied, online_hadamard=n_online, online_hadamard_vision=n_vision)


def _online(model: nn.Module, infos, hs: dict) -> list[str]:
    """W -> W H_n / sqrt(n) and the layer swapped for a RotatedInputLinear (x -> x H_n / sqrt(n) at run time)."""
    done = []
    for info in infos:
        lin, n = info.module, info.module.in_features
        if n not in hs:
            hs[n] = hadamard_matrix(n) / n ** 0.5                    # raises the one-line error for unknown orders
        lin.weight.copy_((lin.weight.double() @ hs[n]).to(lin.weight.dtype))
        set_module(model, info.name, RotatedInputLinear.from_linear(lin))
        done.append(info.name)
    return done


@torch.no_grad()
def rotate_vision_inputs(model: nn.Module) -> list[str]:
    """Online Hadamard on the input of every vision-tower and projector linear (module docstring): the vision
    tower's LayerNorm subtracts the mean, which does not commute with a residual rotation, so each linear rotates
    its own input instead. FP-identical. Returns the names."""
    return _online(model, llava.linear_layers(model, ("vision", "projector")), {})


@torch.no_grad()
def rotate_mlp_inputs(model: nn.Module, writer_ids: set[int]) -> list[str]:
    """W -> W H_n / sqrt(n) for the last writer of every LLM layer (its MLP output projection), swapped for a
    RotatedInputLinear that applies x -> x H_n / sqrt(n) at run time: FP-identical (H orthogonal). Returns the names."""
    last: dict[int, llava.LinearInfo] = {}
    for info in llava.linear_layers(model, ("llm",)):              # forward order within each layer
        if id(info.module) in writer_ids:
            last[info.block] = info
    return _online(model, last.values(), {})
