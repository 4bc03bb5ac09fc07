"""Cross-layer dependency (paper Sec. 3.2): Eq. 4 conditional entropy, DED, and the entropy-DED correlation.

(a) Eq. 4:  D(k, {k+1}) = - sum_ij p(x_q,ij^(k), x_q,ij^(k+1)) log p(x_q,ij^(k+1) | x_q,ij^(k)) = H(X_{k+1} | X_k)
    estimated from a JOINT histogram of co-located quantization codes of consecutive units (plug-in or
    Miller-Madow, nats). "Co-located" (R, a parameter; the paper indexes both layers by the same ij):
      pairing="index" (default, the literal Eq. 4): element (token i, channel j) of layer k with element
          (token i, channel j) of layer k+1. When the widths differ (d_k != d_{k+1}, e.g. up -> down), every
          element of the WIDER input is paired with channel floor(j * d_narrow / d_wide) of the narrower one
          (proportional channel pairing), so all elements of both inputs are used and equal widths reduce to j <-> j.
      pairing="token": one pair per token: the token's mean code magnitude round(mean_j |q_ij - z_i|) in each
          layer (a width-free per-token summary; integer in 0..2^b-1).
    Tokens are co-located only within a part (same sequence positions); edges across parts are NaN (the partition
    never merges them, see qvlm.partition).
    Differences from the official `QuantAct.compute_DED` (docs §1.B3, §5.3): that is a per-channel token-profile
    heuristic that collapses to ~log T on identical inputs; ours is a true conditional entropy: 0 when
    X_{k+1} = f(X_k), H(X_{k+1}) when independent.

(b) DED (Sec. 3.2, Fig. 2): for unit k, the output discretization error of its successor k+1 (squared error of
    unit k+1's linear outputs, summed over channels, mean over valid tokens) after LAYER-WISE rounding search
    (unit k on its own output, then unit k+1 on its own output with k frozen: sequential AdaRound) minus that after
    a JOINT search of k and k+1 on unit k+1's output. Both are actual learned-rounding searches with the shared
    `qvlm.methods.reconstruct.reconstruct` on calibration data, in a copy of the transformer layer(s) holding the
    pair (every other linear FP, FP-path inputs, so the number isolates the pair). The joint search gets the same
    total budget as the two layer-wise ones (2 x iters, `joint_budget="matched"`). rel_ded = DED / E||y_{k+1}||^2
    makes layers of different output scale comparable (what we correlate with entropy).

(c) fit_line / r_squared: the paper's R^2 of a fitted line entropy vs DED (0.9718 at LLaVA layer 15 on SQA),
    here with its spread over seeds: across layers (`ded_vs_entropy`: x = H of unit k+1's input, y = rel DED(k)) or
    at one layer over groups of calibration samples (`fixed_layer_points`, the paper's per-layer view).

References: Cover & Thomas ch. 2 (conditional entropy); docs/qvlm-method.md §1.A.3-4, §5.3.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import QuantConfig
from ..core.calib import group_forward
from ..core.hooks import (InputTap, calib_batches, capture_inputs, check_train_split, image_token_id, model_inputs,
                          token_masks)
from ..core.qlinear import quant_linears, quantize_module
from ..core.quant import check_bits, quantize
from ..core.reconstruct import ReconConfig, reconstruct
from ..core.units import find_units
from ..errors import QVLMError
from ..models import llava
from ..utils import load_artifact, save_artifact
from .entropy import act_codes, act_step, entropy, run_entropy

PAIRINGS = ("index", "token")


# ------------------------------------------------------------------------------------------- estimators
def conditional_entropy(joint: torch.Tensor, estimator: str = "plugin") -> float:
    """H(Y | X) = H(X, Y) - H(X) (nats) from joint counts (Kx, Ky): rows index X (layer k), columns Y (k+1)."""
    assert joint.dim() == 2, f"joint histogram must be 2-D, got {tuple(joint.shape)}"
    return max(entropy(joint.reshape(-1), estimator) - entropy(joint.sum(1), estimator), 0.0)


def mutual_information(joint: torch.Tensor, estimator: str = "plugin") -> float:
    """I(X; Y) = H(Y) - H(Y | X) (nats)."""
    return entropy(joint.sum(0), estimator) - conditional_entropy(joint, estimator)


def channel_map(d_from: int, d_to: int) -> torch.Tensor:
    """Proportional channel pairing: channel j of a d_from-wide input -> channel floor(j * d_to / d_from)."""
    return torch.arange(d_from) * d_to // d_from


def joint_counts(ca: torch.Tensor, cb: torch.Tensor, k_a: int, k_b: int, pairing: str = "index") -> torch.Tensor:
    """Joint histogram (k_a, k_b) of co-located codes of two layers' inputs over the same N tokens.

    ca: (N, d_a) codes in 0..k_a-1 of layer k; cb: (N, d_b) codes of layer k+1 (see the module doc for pairing).
    For pairing="token" the codes must already be per-token summaries of shape (N,)."""
    if pairing == "token":
        assert ca.dim() == cb.dim() == 1 and ca.shape == cb.shape, "token pairing takes (N,) summaries"
        a, b = ca, cb
    elif pairing == "index":
        assert ca.shape[0] == cb.shape[0], f"layers see different token counts {ca.shape[0]} vs {cb.shape[0]}"
        d_a, d_b = ca.shape[1], cb.shape[1]
        if d_a >= d_b:
            a, b = ca, cb[:, channel_map(d_a, d_b)]                # (N, d_a) pairs
        else:
            a, b = ca[:, channel_map(d_b, d_a)], cb                # (N, d_b) pairs
    else:
        raise QVLMError(f"unknown pairing {pairing!r}", f"use one of {', '.join(PAIRINGS)}")
    flat = (a.reshape(-1) * k_b + b.reshape(-1)).long()
    return torch.bincount(flat, minlength=k_a * k_b).double().reshape(k_a, k_b)


def token_summary(x: torch.Tensor, qcfg: QuantConfig, bits: int, module: nn.Module | None = None) -> torch.Tensor:
    """Per-token mean code magnitude round(mean_j |q_ij - z_i|) in 0..2^b-1: (N, C) activations -> (N,) long."""
    scale, zp = act_step(x, qcfg, bits, module)
    q = quantize(x.float(), scale, zp, bits, qcfg.a_symmetric)                 # (N, C) integer levels
    return (q - zp).abs().mean(-1).round().clamp(0, 2 ** bits - 1).long()


# ------------------------------------------------------------------------------------------- collection (a)
@dataclass
class DependencyStats:
    """Joint code histograms of consecutive units + the config; D(k, {k+1}) per edge on demand."""
    config: dict
    units: list                                   # [[linear key, ...], ...]
    parts: list                                   # part of each unit
    joint: list = field(default_factory=list)     # per edge: (K, K) float64 counts, or None across parts

    def dependency(self, estimator: str = "plugin") -> list[float]:
        """D(k, {k+1}) = H(X_{k+1} | X_k) per edge (Eq. 4), NaN across parts."""
        return [conditional_entropy(j, estimator) if j is not None else math.nan for j in self.joint]

    def mutual_information(self, estimator: str = "plugin") -> list[float]:
        return [mutual_information(j, estimator) if j is not None else math.nan for j in self.joint]


@torch.no_grad()
def run_dependency(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig | None = None,
                   bits: int = 0, pairing: str = "index", batch_size: int = 16, scope=None,
                   meta: dict | None = None) -> DependencyStats:
    """Eq. 4 joint histograms for every consecutive pair of units over calibration `samples` (TRAIN split).

    Streams: only the previous unit's codes are held, so memory is one layer's activations."""
    if pairing not in PAIRINGS:
        raise QVLMError(f"unknown pairing {pairing!r}", f"use one of {', '.join(PAIRINGS)}")
    check_train_split(samples)
    qcfg = qcfg or QuantConfig()
    bits = check_bits(bits or qcfg.a_bits, "bits")
    scope = tuple(scope or qcfg.scope)
    units = find_units(model, processor, samples[0], scope)
    infos = {i.key: i for i in llava.linear_layers(model, scope)}
    first = {u.keys[0]: u for u in units}
    k_lv = 2 ** bits                                                   # levels of a code (or of a summary)
    joint = [torch.zeros(k_lv, k_lv, dtype=torch.float64) if units[e].part == units[e + 1].part else None
             for e in range(len(units) - 1)]
    img_id = image_token_id(model)
    state: dict = {}

    def on_input(key, x):
        u = first[key]
        valid = token_masks(state["batch"], x, img_id, u.part)[0].reshape(-1).cpu()
        x2 = x.reshape(-1, x.shape[-1])
        if pairing == "token":
            c = token_summary(x2, qcfg, bits, infos[key].module).cpu()[valid]              # (N,) summaries
        else:
            c = act_codes(x2, qcfg, bits, infos[key].module).cpu()[valid]                  # (N, C) codes
        prev = state.get("prev")
        if prev is not None and prev[0] == u.index - 1 and joint[prev[0]] is not None:
            joint[prev[0]] += joint_counts(prev[1], c, k_lv, k_lv, pairing)
        state["prev"] = (u.index, c)

    with InputTap({k: infos[k].module for k in first}, on_input):
        for batch in calib_batches(samples, processor, batch_size):
            state["batch"], state["prev"] = batch, None
            model(**model_inputs(model, batch))
    cfg = dict(bits=bits, pairing=pairing, a_symmetric=qcfg.a_symmetric, a_granularity=qcfg.a_granularity,
               scope=list(scope), n_calib=len(samples), **(meta or {}))
    return DependencyStats(cfg, [list(u.keys) for u in units], [u.part for u in units], joint)


def save_dependency(stats: DependencyStats, path) -> Path:
    """Write `stats` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("dependency", stats, path)


def load_dependency(path) -> DependencyStats:
    """Inverse of save_dependency."""
    return load_artifact("dependency", DependencyStats, path, "qvlm.dependency.save_dependency")


# ------------------------------------------------------------------------------------------- (c) R^2
def fit_line(x, y) -> dict:
    """Least-squares line y = slope * x + intercept and its R^2 (Fig. 2: entropy vs DED)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        raise QVLMError(f"need >= 3 finite (entropy, DED) points for a line fit, got {len(x)}",
                        "measure DED on more layers")
    slope, intercept = np.polyfit(x, y, 1)
    return dict(slope=float(slope), intercept=float(intercept), r2=r_squared(x, y, slope, intercept), n=len(x))


def r_squared(x, y, slope: float, intercept: float) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot of the line on (x, y)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def r2_spread(per_seed: list[dict]) -> dict:
    """Mean, std, min and max of R^2 over seeds (each item is a fit_line result)."""
    r2 = np.array([f["r2"] for f in per_seed], np.float64)
    return dict(r2_mean=float(r2.mean()), r2_std=float(r2.std(ddof=1)) if len(r2) > 1 else 0.0,
                r2_min=float(r2.min()), r2_max=float(r2.max()), n_seeds=len(r2))


# ------------------------------------------------------------------------------------------- (b) DED
@dataclass
class DEDStats:
    """Per measured edge k: output error of unit k+1 after layer-wise vs joint rounding search, and their gap."""
    config: dict
    units: list                                   # [[linear key, ...], ...]
    rows: list = field(default_factory=list)      # [{edge, unit, successor, e_layerwise, e_joint, ded, rel_ded, ...}]

    def ded(self, relative: bool = True) -> dict:
        """{edge index: DED} (relative to the successor's FP output energy by default)."""
        return {r["edge"]: r["rel_ded" if relative else "ded"] for r in self.rows}


def _window(blocks: list, qcfg: QuantConfig, keep: set) -> tuple[list, dict]:
    """Quantized deep copies of `blocks` with quantization ON only for the linear keys in `keep`."""
    mods, qls = [], {}
    for b in blocks:
        m = copy.deepcopy(b.module)
        quantize_module(m, qcfg)
        for n, ql in quant_linears(m):
            key = f"{b.key}.{n}"
            ql.quant_enabled = key in keep
            qls[key] = ql
        mods.append(m)
    return mods, qls


def _edge_ded(blocks: list, unit_a: list, unit_b: list, inputs: list, args: list, kwargs: list, masks: list,
              qcfg: QuantConfig, cfg, seed: int, joint_budget: str = "matched") -> dict:
    """DED of one edge (module doc (b)): two layer-wise searches vs one joint search, on unit_b's output."""
    fp_mods = [b.module for b in blocks]
    by_key = {f"{b.key}.{n}": m for b in blocks for n, m in b.module.named_modules()}
    with torch.no_grad():
        fa = group_forward(fp_mods, [by_key[k] for k in unit_a], args, kwargs)
        fb = group_forward(fp_mods, [by_key[k] for k in unit_b], args, kwargs)
        t_a = [fa(x, i) for i, x in enumerate(inputs)]                       # FP outputs of unit a
        t_b = [fb(x, i) for i, x in enumerate(inputs)]                       # FP outputs of unit b
    # layer-wise: unit a on its own output, then unit b on its own output with a frozen (sequential AdaRound)
    torch.manual_seed(seed)
    mods, qls = _window(blocks, qcfg, set(unit_a) | set(unit_b))
    qa, qb = [qls[k] for k in unit_a], [qls[k] for k in unit_b]
    reconstruct(qa, group_forward(mods, qa, args, kwargs), inputs, t_a, masks, cfg)
    for m in qa:
        m.freeze()
    lw = reconstruct(qb, group_forward(mods, qb, args, kwargs), inputs, t_b, masks, cfg)
    # joint: both units at once on unit b's output
    torch.manual_seed(seed)
    mods, qls = _window(blocks, qcfg, set(unit_a) | set(unit_b))
    qa, qb = [qls[k] for k in unit_a], [qls[k] for k in unit_b]
    jcfg = dataclasses.replace(cfg, iters=2 * cfg.iters) if joint_budget == "matched" else cfg
    jt = reconstruct(qa + qb, group_forward(mods, qb, args, kwargs), inputs, t_b, masks, jcfg)
    n = sum(int(m.sum()) for m in masks)
    energy = sum(float(t.float().pow(2).sum(-1)[m].sum()) for t, m in zip(t_b, masks)) / max(n, 1)
    ded = lw["loss"] - jt["loss"]
    return dict(e_layerwise=lw["loss"], e_joint=jt["loss"], e_rtn=lw["loss_rtn"], ded=ded,
                rel_ded=ded / energy if energy > 0 else math.nan, energy=energy)


def run_ded(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig | None = None, cfg=None,
            edges: list[int] | None = None, batch_size: int = 16, seed: int = 0, scope=None,
            joint_budget: str = "matched", meta: dict | None = None) -> DEDStats:
    """DED for each edge k (unit k -> k+1 within a part; default all) on calibration `samples` (TRAIN split).

    The pair is quantized in a copy of the transformer layer(s) holding it, every other linear FP, inputs on the
    FP path, so the number isolates the pair's rounding interaction. `cfg` is a ReconConfig (iters, lr, ...).
    joint_budget "matched" (default): the joint search gets 2 x iters, the layer-wise searches' total, so DED
    compares searches of equal cost; "same": iters for each search (the joint one then under-converges)."""
    if joint_budget not in ("matched", "same"):
        raise QVLMError(f"unknown joint_budget {joint_budget!r}", "use 'matched' or 'same'")
    check_train_split(samples)
    qcfg, cfg = qcfg or QuantConfig(), cfg or ReconConfig()
    scope = tuple(scope or qcfg.scope)
    units = find_units(model, processor, samples[0], scope)
    layers = {b.key: b for b in llava.blocks(model, scope)}
    order = list(layers)
    todo = [e for e in range(len(units) - 1) if units[e].part == units[e + 1].part] if edges is None else list(edges)
    batches = calib_batches(samples, processor, batch_size)
    img_id = image_token_id(model)
    cache: dict[str, list] = {}
    batches_of: dict[str, list] = {}
    out = DEDStats(dict(asdict(cfg), bits=qcfg.a_bits, w_bits=qcfg.w_bits, scope=list(scope), seed=seed,
                        n_calib=len(samples), joint_budget=joint_budget, **(meta or {})), [list(u.keys) for u in units])
    for e in todo:
        a, b = units[e], units[e + 1]
        if a.part != b.part:
            raise QVLMError(f"edge {e} crosses parts ({a.part} -> {b.part})", "measure DED within a part only")
        first, last = f"{a.part}.{a.block}", f"{b.part}.{b.block}"
        span = [layers[k] for k in order[order.index(first): order.index(last) + 1]]
        if first not in cache:
            with torch.no_grad():
                caps = capture_inputs(model, batches, layers[first].module)
            cache[first] = [c for c in caps if c is not None]
            batches_of[first] = [bt for bt, c in zip(batches, caps) if c is not None]
        caps = cache[first]
        inputs = [c[0][0] for c in caps]
        masks = [token_masks(bt, x, img_id, a.part)[0] for bt, x in zip(batches_of[first], inputs)]
        row = _edge_ded(span, a.keys, b.keys, inputs, [c[0][1:] for c in caps], [c[1] for c in caps], masks,
                        qcfg, cfg, seed, joint_budget)
        out.rows.append(dict(edge=e, unit=a.name, successor=b.name, **row))
    return out


def ded_vs_entropy(ded: DEDStats, unit_entropy: list[float], relative: bool = True) -> dict:
    """Fig. 2 across layers: fit DED(k) against the entropy of unit k+1's quantized input; returns fit_line()."""
    d = ded.ded(relative)
    edges = sorted(d)
    return fit_line([unit_entropy[e + 1] for e in edges], [d[e] for e in edges])


def fixed_layer_points(model: nn.Module, processor, samples: list[dict], edge: int, qcfg: QuantConfig | None = None,
                       cfg=None, group_size: int = 2, seed: int = 0, scope=None) -> list[dict]:
    """Fig. 2 at ONE layer (the paper's R^2 = 0.9718 is at LLaVA layer 15): one point per group of `group_size`
    calibration samples: (entropy of unit edge+1's quantized input on that group, its relative DED)."""
    pts = []
    for g in range(0, len(samples) - group_size + 1, group_size):
        grp = samples[g:g + group_size]
        h = run_entropy(model, processor, grp, qcfg, scope=scope).unit_entropy()[edge + 1]
        row = run_ded(model, processor, grp, qcfg, cfg, edges=[edge], seed=seed, scope=scope).rows[0]
        pts.append(dict(group=g // group_size, entropy=h, ded=row["rel_ded"]))
    return pts
