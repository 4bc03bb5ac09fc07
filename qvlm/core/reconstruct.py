"""Learned rounding + activation steps by output reconstruction: the machinery of AdaRound, BRECQ and QDrop,
reusable over ANY group of consecutive QuantLinears (one layer, one transformer block, a part of a block, or
several blocks -- e.g. Q-VLM's entropy-guided blocks, §3.2 of the paper).

API
---
    stats = reconstruct(qlinears, forward, inputs, targets, masks=None, cfg=ReconConfig(), progress=False)

    qlinears  the QuantLinears whose parameters are learned (RTN step sizes already set, not frozen). Other
              QuantLinears that `forward` runs stay as they are (e.g. already frozen, or RTN).
    forward   forward(x, i) -> y: runs the sub-graph containing the group on input x of calibration batch i
              (i lets it look up that batch's attention mask / position embeddings). Typical choices:
                  one layer        lambda x, i: ql(x)
                  a unit (blocks)  lambda x, i: data.forward(i, x)        (data: qvlm.calib.BlockData)
              A group smaller than a block can use the whole block's forward: only its layers learn.
    inputs    [ (B, T, C_in) ] per batch, the group's input along the QUANTIZED path (no grad)
    targets   [ (B, T, C_out) ] per batch, the FP outputs to reconstruct (BRECQ / QDrop use the FP model's
              output on the FP input: `data.targets`; `data.local_targets()` gives FP outputs on `inputs`)
    masks     [ (B, T) bool ] valid tokens (padding excluded from the loss); None = all

    returns   dict(loss_rtn, loss, reverted, iters, seconds): the objective (mean over valid tokens of the
              squared error summed over channels, hard rounding) at RTN and after learning. If learning did not
              lower it (or it is NaN), every learned tensor is reset to its start, the exact state `loss_rtn` was
              measured in (reverted=True; `loss` == `loss_rtn` then): never worse than RTN.

What is learned (each QuantLinear of the group), jointly with Adam:
    rounding    AdaRound offsets (Nagel et al. 2020, Eq. 21-24): W_hat = s * (clamp(floor(W/s) + h(alpha) + z) - z),
                h = rectified sigmoid, initialised at RTN; loss + lambda * sum(1 - |2h - 1|^beta) with beta annealed
                from beta_start to beta_end after a warm-up without regulariser; hard rounding h >= 0.5 at the end.
    activation  (cfg.learn_act) static per-tensor step `a_scale` (LSQ, Esser et al. 2020) or, for dynamic
                per-token activations, a clipping ratio `a_clip` of each token's range; straight-through rounding.
                Static ranges not yet calibrated are observed (min/max) before learning starts.
    QDrop       (cfg.drop_prob > 0) each activation element stays unquantized with that probability during
                learning (Wei et al. 2022); never at evaluation.
After `reconstruct` the layers keep their learned tensors in "hard" mode; call `QuantLinear.freeze()` (the
calibration driver does) to bake them.

References: yhhhli/BRECQ `quant/adaptive_rounding.py`, `quant/block_recon.py`; wimh966/QDrop `quant/block_recon.py`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import QVLMError
from .qlinear import QuantLinear, rectified_sigmoid


BUDGET_UNITS = ("steps", "compute")


@dataclass(frozen=True)
class ReconConfig:
    iters: int = 200             # Adam steps per group (BRECQ uses 20k on ImageNet; PRESETS['full'] iters = 200)
    lr: float = 1e-2             # rounding logits; 10x AdaRound's 1e-3 because we run ~100x fewer steps
    lr_act: float = 1e-2         # activation step / clip, RELATIVE to its initial value per step
    reg_weight: float = 0.01     # lambda of the rounding regulariser (AdaRound / BRECQ default)
    beta_start: float = 20.0     # regulariser annealing: beta from 20 to 2 (AdaRound)
    beta_end: float = 2.0
    warmup: float = 0.2          # fraction of iterations without the regulariser (AdaRound)
    learn_rounding: bool = True
    learn_act: bool = False      # also learn activation step (static) / clipping ratio (dynamic)
    drop_prob: float = 0.0       # QDrop: probability of keeping an activation element FP while learning (paper: 0.5)
    budget: int = 0              # total Adam steps over ALL groups of a run, split by group size; 0 = iters per group
    budget_unit: str = "steps"   # what `budget` fixes: "steps" (their sum) | "compute" (the linear-steps of the layer-wise search with `budget` steps)

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 0:
            raise QVLMError(f"iters={self.iters!r} must be a non-negative integer", "pass --iters 0 or more")
        if not isinstance(self.budget, int) or self.budget < 0:
            raise QVLMError(f"budget={self.budget!r} must be a non-negative integer", "pass --budget 0 or more")
        if self.budget_unit not in BUDGET_UNITS:
            raise QVLMError(f"unknown budget_unit {self.budget_unit!r}", f"use one of {', '.join(BUDGET_UNITS)}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise QVLMError(f"drop_prob={self.drop_prob} is outside [0, 1)", "pass 0 <= drop_prob < 1")


def allocate_steps(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` optimisation steps over groups in proportion to `weights` (e.g. linears per block), as
    integers that sum to `total` exactly (largest remainder; ties to the earlier group)."""
    if total < 0 or not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise QVLMError(f"cannot split {total} steps over weights {list(weights)[:5]}...",
                        "pass a non-negative budget and positive group sizes")
    share = [total * w / sum(weights) for w in weights]
    out = [int(x) for x in share]
    order = sorted(range(len(share)), key=lambda i: (-(share[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def allocate_compute(linear_steps: int, group_sizes: Sequence[int]) -> list[int]:
    """Integer steps per group (in proportion to group size, as allocate_steps) whose linear-steps
    sum_g steps_g * n_g come closest to `linear_steps`: the real shares rounded down, then, in order of largest
    remainder, one more step for each group whose step brings the sum closer. Rounding the step counts alone can
    miss by most of a large group's step (n linear-steps): one block per part (smol: 72, 2 and 210 linears, 17
    steps) spent 4.6 % over its budget that way."""
    n2 = sum(n * n for n in group_sizes)
    if linear_steps < 0 or not group_sizes or any(n <= 0 for n in group_sizes):
        raise QVLMError(f"cannot split {linear_steps} linear-steps over groups {list(group_sizes)[:5]}...",
                        "pass a non-negative budget and positive group sizes")
    share = [linear_steps * n / n2 for n in group_sizes]                 # sum_g share_g * n_g = linear_steps
    out = [int(x) for x in share]
    gap = linear_steps - sum(k * n for k, n in zip(out, group_sizes))
    for i in sorted(range(len(share)), key=lambda i: (-(share[i] - out[i]), i)):
        if abs(gap - group_sizes[i]) < abs(gap):
            out[i] += 1
            gap -= group_sizes[i]
    return out


def budget_steps(cfg: ReconConfig, group_sizes: Sequence[int], layer_sizes: Sequence[int]) -> list[int]:
    """Steps of each group (linears optimised jointly, `group_sizes` linears each) of a run: cfg.iters each, or
    with cfg.budget > 0 a total split in proportion to group size. The total is
      "steps"    cfg.budget itself (allocate_steps): equal steps, but a step of an n-linear group evaluates n linears
                 forward and backward, so a partition into deeper groups spends more compute per step;
      "compute"  the linear-steps (sum_g steps_g * n_g) of the layer-wise search (one group per transformer layer,
                 `layer_sizes` linears each) given cfg.budget steps, split over the groups (allocate_compute): equal
                 compute. Deeper groups then get fewer steps; single linears (AdaRound) more; the layer-wise
                 search itself gets exactly cfg.budget.
    """
    if not cfg.budget:
        return [cfg.iters] * len(group_sizes)
    if cfg.budget_unit == "steps":
        return allocate_steps(cfg.budget, group_sizes)
    reference = allocate_steps(cfg.budget, layer_sizes)                      # the layer-wise search's steps
    if list(group_sizes) == list(layer_sizes):
        return reference
    return allocate_compute(sum(k * n for k, n in zip(reference, layer_sizes)), group_sizes)


def _masked_sq_error(y: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None,
                     weight: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum over valid tokens of w_t ||y_t - t_t||^2 summed over channels, number of valid tokens); w_t = 1 unless
    a (B, T) token `weight` is given (MBQ's modality weights)."""
    d = (y.float() - t.float()).pow(2).sum(-1)                                  # (B, T)
    if weight is not None:
        d = d * weight.to(d.device, d.dtype)
    if mask is not None and tuple(mask.shape) == tuple(d.shape):
        return d[mask].sum(), int(mask.sum())
    return d.sum(), d.numel()


@torch.no_grad()
def objective(forward: Callable, inputs: Sequence, targets: Sequence, masks: Sequence | None = None,
              weights: Sequence | None = None) -> float:
    """Mean over valid tokens of the squared output error summed over channels (the reconstruction loss), each
    token weighted by `weights[i]` (B, T) when given."""
    tot, n = 0.0, 0
    for i, (x, t) in enumerate(zip(inputs, targets)):
        e, k = _masked_sq_error(forward(x, i), t, masks[i] if masks is not None else None,
                                weights[i] if weights is not None else None)
        tot, n = tot + float(e), n + k
    return tot / max(n, 1)


def unique_act_quantizers(qlinears) -> list:
    """The distinct activation quantizers of `qlinears` (q|k|v share one), in order."""
    seen, out = set(), []
    for m in qlinears:
        if m.quantizes_act and id(m.act) not in seen:
            seen.add(id(m.act))
            out.append(m.act)
    return out


def _observe(qlinears, forward, inputs, masks) -> None:
    todo = [a for a in unique_act_quantizers(qlinears) if a.needs_calibration]
    if not todo:
        return
    for a in todo:
        a.observing = True
    with torch.no_grad():
        for i, x in enumerate(inputs):
            for a in todo:
                a.obs_mask = masks[i] if masks is not None else None
            forward(x, i)
    for a in todo:
        a.obs_mask = None
        a.finish_observing()


def _act_param_name(a) -> str:
    return "a_scale" if (a.a_granularity == "tensor" and a.a_scale is not None) else "a_clip"


@contextlib.contextmanager
def _learning(qlinears, cfg: ReconConfig):
    """Turn on learnable tensors for the group; afterwards everything is back in hard / eval mode.
    Yields {id(quantizer): (name, initial value)} of the learned activation tensors (one per shared quantizer)."""
    start = {}
    for m in qlinears:
        if cfg.learn_rounding and m.quantizes_weight and m.weight_format == "int":
            m.init_learned_rounding()
    quantizers = unique_act_quantizers(qlinears)
    for a in quantizers:
        if cfg.learn_act:
            name = _act_param_name(a)
            init = getattr(a, name)
            init = torch.tensor(1.0, device=qlinears[0].weight.device) if init is None else init.detach().float()
            a.set_tensor(name, init, learnable=True)
            start[id(a)] = (a, name, init.clone())
        a.drop_prob = cfg.drop_prob
    try:
        yield start
    finally:
        for m in qlinears:
            m.round_mode = "hard"
            if isinstance(m.round_logits, torch.nn.Parameter):
                m.set_tensor("round_logits", m.round_logits.detach())
        for a in quantizers:
            a.drop_prob = 0.0
            for name in ("a_scale", "a_clip"):
                t = getattr(a, name)
                if isinstance(t, torch.nn.Parameter):
                    a.set_tensor(name, t.detach())


def reconstruct(qlinears: Sequence[QuantLinear], forward: Callable, inputs: Sequence[torch.Tensor],
                targets: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None,
                cfg: ReconConfig = ReconConfig(), progress: bool = False, desc: str = "reconstruct") -> dict:
    """Learn the rounding (and optionally activation steps) of `qlinears` to reconstruct `targets` (module doc)."""
    t0 = time.perf_counter()
    qlinears = [m for m in qlinears if not m.weight_on_grid]
    if not inputs or not qlinears:
        return dict(loss_rtn=None, loss=None, reverted=False, iters=0, seconds=0.0)
    _observe(qlinears, forward, inputs, masks)
    loss_rtn = objective(forward, inputs, targets, masks)
    rounding_start = [m.round_logits for m in qlinears]     # None: round-to-nearest, what loss_rtn measured
    with _learning(qlinears, cfg) as start:
        rounding = [m.round_logits for m in qlinears if m.round_logits is not None]
        groups = [{"params": rounding, "lr": cfg.lr}] if rounding else []
        for a, name, init in start.values():
            groups.append({"params": [getattr(a, name)], "lr": cfg.lr_act * float(init.abs().clamp_min(1e-8))})
        opt = torch.optim.Adam(groups) if groups else None
        n_warm = int(cfg.warmup * cfg.iters)
        bar = tqdm(range(cfg.iters if opt else 0), desc=desc, disable=not progress, leave=False)
        for m in qlinears:
            m.round_mode = "soft"
        for it in bar:
            i = int(torch.randint(len(inputs), ()))
            with torch.enable_grad():
                err, n = _masked_sq_error(forward(inputs[i], i), targets[i], masks[i] if masks is not None else None)
                loss = err / max(n, 1)
                if rounding and it >= n_warm:
                    frac = (it - n_warm) / max(cfg.iters - n_warm, 1)
                    beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1 - frac)
                    reg = sum((1 - (2 * rectified_sigmoid(a) - 1).abs().pow(beta)).sum() for a in rounding)
                    loss = loss + cfg.reg_weight * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for m in qlinears:
            m.round_mode = "hard"
        loss = objective(forward, inputs, targets, masks)
        reverted = not loss < loss_rtn                    # a NaN loss is no improvement either
        if reverted:                                      # never worse than the RTN start: back to it exactly
            for m, start_logits in zip(qlinears, rounding_start):
                m.set_tensor("round_logits", start_logits)   # not init_learned_rounding(): at a tie (frac = 0.5)
                m.round_mode = "hard"                        # its h >= 0.5 rounds up where RTN rounds half to even
            for a, name, init in start.values():
                getattr(a, name).data.copy_(init)
            loss = objective(forward, inputs, targets, masks)
    return dict(loss_rtn=loss_rtn, loss=loss, reverted=bool(reverted), iters=cfg.iters,
                seconds=time.perf_counter() - t0)
