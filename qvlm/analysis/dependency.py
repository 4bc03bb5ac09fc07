"""Cross-layer dependency (paper Sec. 3.2): Eq. 4 conditional entropy, DED, and the entropy-DED correlation.

Nodes: transformer LAYERS (granularity "layer", the paper's unit: "the 15th layer") or linear units (granularity
"unit": linears reading one input). Edges join consecutive nodes of one part (vision | projector | LLM); an edge
across parts is NaN (tokens are not co-located there, and the partition never merges it).

(a) Eq. 4:  D(k, {k+1}) = - sum_ij p(x_q,ij^(k), x_q,ij^(k+1)) log p(x_q,ij^(k+1) | x_q,ij^(k)) = H(X_{k+1} | X_k)
    estimated from a JOINT histogram of co-located quantization codes (plug-in or Miller-Madow, nats). The paper
    indexes both layers by the same ij; which elements are co-located is a choice (`pairing`):
      "residual" (layer granularity, default): element (token i, channel j) of layer k's input with (token i,
          channel j) of layer k+1's input, where a layer's input is the quantized input of its first linear unit
          (the normalised residual stream x_k: q|k|v of a decoder or ViT layer). Consecutive layers read the SAME
          residual stream, x_{k+1} = x_k + f(x_k), channel j for channel j, so this pairing measures how much of
          layer k+1's quantized input is NOT already determined by layer k's: a meaningful dependency.
      "index": the same element-wise pairing between any two nodes' inputs, with proportional channel pairing
          when widths differ (floor(j * d_narrow / d_wide)). Between units of one layer (e.g. q|k|v -> o) the
          channels are unrelated, so D is close to H(X_{k+1}): it mostly measures the successor's entropy.
      "token": one pair per token, its mean code magnitude round(mean_j |q_ij - z_i|) in each node (width-free).
    Ours is a true conditional entropy (0 when X_{k+1} = f(X_k), H(X_{k+1}) when independent); the official
    `QuantAct.compute_DED` is a per-channel token-profile heuristic that collapses to ~log T on identical inputs.

(b) DED (Sec. 3.2, Fig. 2): for node k, the output discretization error of its successor k+1 after a LAYER-WISE
    rounding search (node k reconstructed on its own output, then node k+1 on its own output with k frozen) minus
    that after a JOINT search of k and k+1 on node k+1's output. The output of a layer node is its residual
    output (hidden states leaving the layer); of a unit node, its linears' outputs. Both arms are real learned-
    rounding searches (qvlm.core.reconstruct) in copies of the layer(s) holding the pair (every other linear FP,
    FP-path inputs, so the number isolates the pair's interaction). Budget (`joint_budget`):
      "per_parameter" (default): every search runs `iters` steps, so every rounding parameter gets the same number
          of updates in both arms; the joint arm then takes HALF the total steps of the layer-wise arm, so a positive
          DED cannot come from a larger budget.
      "total": the joint search runs 2 x iters, the layer-wise arm's total.
    rel_ded = DED / E||y_{k+1}||^2 makes nodes of different output scale comparable.

(c) fit_line / r_squared: the paper's R^2 of a fitted line entropy vs DED (0.9718 at LLaVA layer 15 on SQA),
    with its spread over seeds: across layers (`ded_vs_entropy`) or at one layer over groups of calibration
    samples (`fixed_layer_points`, the paper's per-layer view).

References: Cover & Thomas ch. 2 (conditional entropy).
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
from ..core.hooks import call_block
from ..core.hooks import (InputTap, calib_batches, capture_inputs, check_train_split, image_token_id, model_inputs,
                          token_masks)
from ..core.qlinear import quant_linears, quantize_module, share_act_quantizer
from ..core.quant import check_bits, quantize
from ..core.reconstruct import ReconConfig, reconstruct
from ..core.units import find_units, unit_name
from ..errors import QVLMError
from ..models import llava
from ..utils import load_artifact, save_artifact
from .entropy import act_codes, act_step, entropy, run_entropy

PAIRINGS = ("residual", "index", "token")
GRANULARITIES = ("layer", "unit")
JOINT_BUDGETS = ("per_parameter", "total")


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
    elif pairing in ("index", "residual"):
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
    scale, zero_point = act_step(x, qcfg, bits, module)
    q = quantize(x.float(), scale, zero_point, bits, qcfg.a_symmetric)          # (N, C) integer levels
    return (q - zero_point).abs().mean(-1).round().clamp(0, 2 ** bits - 1).long()


# ------------------------------------------------------------------------------------------- collection (a)
@dataclass
class DependencyStats:
    """Joint code histograms of consecutive units + the config; D(k, {k+1}) per edge on demand."""
    config: dict
    units: list                                   # nodes: [[layer key]] or [[linear key, ...]], forward order
    parts: list                                   # part of each node
    joint: list = field(default_factory=list)     # per edge: (K, K) float64 counts, or None across parts

    def dependency(self, estimator: str = "plugin") -> list[float]:
        """D(k, {k+1}) = H(X_{k+1} | X_k) per edge (Eq. 4), NaN across parts."""
        return [conditional_entropy(j, estimator) if j is not None else math.nan for j in self.joint]

    def mutual_information(self, estimator: str = "plugin") -> list[float]:
        return [mutual_information(j, estimator) if j is not None else math.nan for j in self.joint]


def _nodes(model, processor, sample: dict, scope, granularity: str) -> tuple[list, list, list]:
    """(node keys, node parts, first linear key of each node): layers ('llm.3') or linear units."""
    units = find_units(model, processor, sample, scope)
    if granularity == "unit":
        return [list(u.keys) for u in units], [u.part for u in units], [u.keys[0] for u in units]
    first = {}
    for u in units:
        first.setdefault(u.layer, u)
    return [[k] for k in first], [u.part for u in first.values()], [u.keys[0] for u in first.values()]


@torch.no_grad()
def run_dependency(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig | None = None,
                   bits: int = 0, pairing: str = "residual", batch_size: int = 16, scope=None,
                   granularity: str = "layer", meta: dict | None = None) -> DependencyStats:
    """Eq. 4 joint histograms for every consecutive pair of nodes over calibration `samples` (TRAIN split).

    Streams: only the previous node's codes are held, so memory is one layer's activations."""
    if pairing not in PAIRINGS:
        raise QVLMError(f"unknown pairing {pairing!r}", f"use one of {', '.join(PAIRINGS)}")
    if granularity not in GRANULARITIES:
        raise QVLMError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
    if pairing == "residual" and granularity != "layer":
        raise QVLMError("pairing 'residual' pairs consecutive LAYERS' inputs", "use granularity 'layer' or pairing 'index'")
    check_train_split(samples)
    qcfg = qcfg or QuantConfig()
    bits = check_bits(bits or qcfg.a_bits, "bits")
    scope = tuple(scope or qcfg.scope)
    nodes, parts, firsts = _nodes(model, processor, samples[0], scope, granularity)
    infos = {i.key: i for i in llava.linear_layers(model, scope)}
    index = {k: i for i, k in enumerate(firsts)}
    k_lv = 2 ** bits                                                   # levels of a code (or of a summary)
    joint = [torch.zeros(k_lv, k_lv, dtype=torch.float64) if parts[e] == parts[e + 1] else None
             for e in range(len(nodes) - 1)]
    img_id = image_token_id(model)
    state: dict = {}

    def on_input(key, x):
        n = index[key]
        valid = token_masks(state["batch"], x, img_id, parts[n])[0].reshape(-1).cpu()
        x2 = x.reshape(-1, x.shape[-1])
        if pairing == "token":
            c = token_summary(x2, qcfg, bits, infos[key].module).cpu()[valid]              # (N,) summaries
        else:
            c = act_codes(x2, qcfg, bits, infos[key].module).cpu()[valid]                  # (N, C) codes
        prev = state.get("prev")
        if prev is not None and prev[0] == n - 1 and joint[prev[0]] is not None:
            joint[prev[0]] += joint_counts(prev[1], c, k_lv, k_lv, pairing)
        state["prev"] = (n, c)

    with InputTap({k: infos[k].module for k in firsts}, on_input):
        for batch in calib_batches(samples, processor, batch_size):
            state["batch"], state["prev"] = batch, None
            model(**model_inputs(model, batch))
    cfg = dict(bits=bits, pairing=pairing, granularity=granularity, a_symmetric=qcfg.a_symmetric,
               a_granularity=qcfg.a_granularity, scope=list(scope), n_calib=len(samples), **(meta or {}))
    return DependencyStats(cfg, nodes, parts, joint)


def save_dependency(stats: DependencyStats, path) -> Path:
    """Write `stats` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("dependency", stats, path)


def load_dependency(path) -> DependencyStats:
    """Inverse of save_dependency."""
    return load_artifact("dependency", DependencyStats, path, "qvlm.analysis.dependency.save_dependency")


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


def _window(blocks: list, qcfg: QuantConfig, keep: set, units: list) -> tuple[list, dict]:
    """Quantized deep copies of `blocks` with quantization ON only for the linear keys in `keep`; the linears of
    one unit share one activation quantizer, as in every method."""
    mods, qls = [], {}
    for b in blocks:
        m = copy.deepcopy(b.module)
        quantize_module(m, qcfg)
        for n, ql in quant_linears(m):
            key = f"{b.key}.{n}"
            ql.quant_enabled = key in keep
            qls[key] = ql
        mods.append(m)
    for u in units:
        if len(u.keys) > 1 and all(k in qls for k in u.keys):
            share_act_quantizer([qls[k] for k in u.keys])
    return mods, qls


def _layers_forward(mods: list, upto: int, args, kwargs):
    """forward(x, i): run mods[0..upto] (consecutive transformer layers) and return the last one's hidden states."""
    def forward(x, i):
        for m in mods[: upto + 1]:
            x = call_block(m, x, args[i], kwargs[i])
        return x
    return forward


def _edge_ded(blocks: list, keys_a: list, keys_b: list, inputs: list, args: list, kwargs: list, masks: list,
              qcfg: QuantConfig, cfg, seed: int, joint_budget: str, granularity: str, units: list) -> dict:
    """DED of one edge (module doc (b)): layer-wise searches (a, then b with a frozen) vs one joint search, on b's
    output. keys_*: the linear keys of each node; with granularity "layer" the window is [layer a, layer b]."""
    fp_mods = [b.module for b in blocks]
    by_key = {f"{b.key}.{n}": m for b in blocks for n, m in b.module.named_modules()}

    def fwd(mods, keys, node):                  # node 0 = a, 1 = b
        if granularity == "layer":
            return _layers_forward(mods, node, args, kwargs)
        return group_forward(mods, [keys[k] for k in (keys_a, keys_b)[node]], args, kwargs)

    with torch.no_grad():
        t_a = [fwd(fp_mods, by_key, 0)(x, i) for i, x in enumerate(inputs)]     # FP outputs of node a
        t_b = [fwd(fp_mods, by_key, 1)(x, i) for i, x in enumerate(inputs)]     # FP outputs of node b
    keep = set(keys_a) | set(keys_b)
    # layer-wise: a on its own output, then b on its own output with a frozen (sequential search)
    torch.manual_seed(seed)
    mods, qls = _window(blocks, qcfg, keep, units)
    qa, qb = [qls[k] for k in keys_a], [qls[k] for k in keys_b]
    reconstruct(qa, fwd(mods, qls, 0), inputs, t_a, masks, cfg)
    for m in qa:
        m.freeze()
    lw = reconstruct(qb, fwd(mods, qls, 1), inputs, t_b, masks, cfg)
    # joint: both at once on b's output
    torch.manual_seed(seed)
    mods, qls = _window(blocks, qcfg, keep, units)
    qa, qb = [qls[k] for k in keys_a], [qls[k] for k in keys_b]
    jcfg = dataclasses.replace(cfg, iters=2 * cfg.iters) if joint_budget == "total" else cfg
    jt = reconstruct(qa + qb, fwd(mods, qls, 1), inputs, t_b, masks, jcfg)
    n = sum(int(m.sum()) for m in masks)
    energy = sum(float(t.float().pow(2).sum(-1)[m].sum()) for t, m in zip(t_b, masks)) / max(n, 1)
    ded = lw["loss"] - jt["loss"]
    return dict(e_layerwise=lw["loss"], e_joint=jt["loss"], e_rtn=lw["loss_rtn"], ded=ded,
                rel_ded=ded / energy if energy > 0 else math.nan, energy=energy,
                steps_layerwise=2 * cfg.iters, steps_joint=jcfg.iters)


def run_ded(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig | None = None, cfg=None,
            edges: list[int] | None = None, batch_size: int = 16, seed: int = 0, scope=None,
            joint_budget: str = "per_parameter", granularity: str = "layer", meta: dict | None = None) -> DEDStats:
    """DED for each edge k (node k -> k+1 within a part; default all) on calibration `samples` (TRAIN split).

    The pair is quantized in a copy of the transformer layer(s) holding it, every other linear FP, inputs on the
    FP path, so the number isolates the pair's rounding interaction. `cfg` is a ReconConfig (iters, lr, ...)."""
    if joint_budget not in JOINT_BUDGETS:
        raise QVLMError(f"unknown joint_budget {joint_budget!r}", f"use one of {', '.join(JOINT_BUDGETS)}")
    if granularity not in GRANULARITIES:
        raise QVLMError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
    check_train_split(samples)
    qcfg, cfg = qcfg or QuantConfig(), cfg or ReconConfig()
    scope = tuple(scope or qcfg.scope)
    units = find_units(model, processor, samples[0], scope)
    nodes, parts, _ = _nodes(model, processor, samples[0], scope, granularity)
    keys_of = ([[k for u in units if u.layer == n[0] for k in u.keys] for n in nodes] if granularity == "layer"
               else nodes)
    layer_of_node = [n[0] if granularity == "layer" else f"{units[i].part}.{units[i].block}" for i, n in enumerate(nodes)]
    layers = {b.key: b for b in llava.blocks(model, scope)}
    order = list(layers)
    todo = [e for e in range(len(nodes) - 1) if parts[e] == parts[e + 1]] if edges is None else list(edges)
    batches = calib_batches(samples, processor, batch_size)
    img_id = image_token_id(model)
    cache: dict[str, tuple] = {}
    out = DEDStats(dict(asdict(cfg), bits=qcfg.a_bits, w_bits=qcfg.w_bits, scope=list(scope), seed=seed,
                        n_calib=len(samples), joint_budget=joint_budget, granularity=granularity, **(meta or {})),
                   nodes)
    for e in todo:
        if parts[e] != parts[e + 1]:
            raise QVLMError(f"edge {e} crosses parts ({parts[e]} -> {parts[e + 1]})", "measure DED within a part only")
        first, last = layer_of_node[e], layer_of_node[e + 1]
        span = [layers[k] for k in order[order.index(first): order.index(last) + 1]]
        if first not in cache:
            with torch.no_grad():
                caps = capture_inputs(model, batches, layers[first].module)
            kept = [(c, bt) for c, bt in zip(caps, batches) if c is not None]
            cache[first] = ([c for c, _ in kept], [token_masks(bt, c[0][0], img_id, parts[e])[0] for c, bt in kept])
        caps, masks = cache[first]
        row = _edge_ded(span, keys_of[e], keys_of[e + 1], [c[0][0] for c in caps], [c[0][1:] for c in caps],
                        [c[1] for c in caps], masks, qcfg, cfg, seed, joint_budget, granularity, units)
        name = (lambda n: n[0] if granularity == "layer" else unit_name(n))
        out.rows.append(dict(edge=e, unit=name(nodes[e]), successor=name(nodes[e + 1]), **row))
    return out


def ded_vs_entropy(ded: DEDStats, node_entropy: list[float], relative: bool = True) -> dict:
    """Fig. 2 across layers: fit DED(k) against the entropy of node k+1's quantized input; returns fit_line()."""
    d = ded.ded(relative)
    edges = sorted(d)
    return fit_line([node_entropy[e + 1] for e in edges], [d[e] for e in edges])


def node_entropy(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig | None = None, scope=None,
                 granularity: str = "layer", split: str = "all") -> list[float]:
    """H(x_q) per node, in the order of run_ded / run_dependency: layer entropy (pooled) or unit entropy."""
    st = run_entropy(model, processor, samples, qcfg, scope=scope)
    return st.layer_entropy(split) if granularity == "layer" else st.unit_entropy(split)


def fixed_layer_points(model: nn.Module, processor, samples: list[dict], edge: int, qcfg: QuantConfig | None = None,
                       cfg=None, group_size: int = 2, seed: int = 0, scope=None, granularity: str = "layer",
                       joint_budget: str = "per_parameter") -> list[dict]:
    """Fig. 2 at ONE layer (the paper's R^2 = 0.9718 is at LLaVA layer 15): one point per group of `group_size`
    calibration samples: (entropy of node edge+1's quantized input on that group, its relative DED)."""
    pts = []
    for g in range(0, len(samples) - group_size + 1, group_size):
        grp = samples[g:g + group_size]
        h = node_entropy(model, processor, grp, qcfg, scope, granularity)[edge + 1]
        row = run_ded(model, processor, grp, qcfg, cfg, edges=[edge], seed=seed, scope=scope,
                      granularity=granularity, joint_budget=joint_budget).rows[0]
        pts.append(dict(group=g // group_size, entropy=h, ded=row["rel_ded"]))
    return pts


# ------------------------------------------------------------------------------------------- the study (Fig. 2)
def select_edges(edges: list[int], spec: str = "all") -> list[int]:
    """'all' | 'every:K' (every K-th edge, starting at the first) | 'a,b,c' (those edge indices)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(edges)
    if spec.startswith("every:"):
        return list(edges)[:: max(1, int(spec.split(":", 1)[1]))]
    want = [int(x) for x in spec.split(",") if x.strip()]
    bad = [e for e in want if e not in edges]
    if bad:
        raise QVLMError(f"edges {bad} are not within-part edges of this model", f"pick from {list(edges)}")
    return want


def study(model: nn.Module, processor, calib_sets: dict[int, list[dict]], qcfg: QuantConfig, cfg: ReconConfig,
          scope=("llm",), granularity: str = "layer", pairing: str = "residual", edges: str = "all",
          batch_size: int = 16, joint_budget: str = "per_parameter") -> dict:
    """Fig. 2 across layers, per calibration seed: D (Eq. 4) and H of the successor per edge, DED per edge from
    real searches, and the line fits DED ~ H and DED ~ D per seed and pooled over seeds.

    Returns dict(edges: per-edge table of the first seed (H_next: the successor's layer entropy; D, MI; H_paired:
    the entropy of the paired codes of the successor, so that D <= H_paired), rows: per (seed, edge) DED rows with
    H_next and D, fits: {"H": {seed: fit}, "D": {seed: fit}, "H_pooled": fit, "D_pooled": fit}, spread)."""
    seeds = sorted(calib_sets)
    rows, fits, edge_table = [], {"H": {}, "D": {}}, None
    for s in seeds:
        samples = calib_sets[s]
        h = node_entropy(model, processor, samples, qcfg, scope, granularity)
        dep = run_dependency(model, processor, samples, qcfg, pairing=pairing, batch_size=batch_size, scope=scope,
                             granularity=granularity)
        d, mi = dep.dependency(), dep.mutual_information()
        within = [e for e in range(len(d)) if dep.parts[e] == dep.parts[e + 1]]
        todo = select_edges(within, edges)
        if edge_table is None:
            names = [n[0] if granularity == "layer" else unit_name(n) for n in dep.units]
            edge_table = [dict(edge=e, unit=names[e], successor=names[e + 1], H_next=h[e + 1], D=d[e], MI=mi[e],
                               H_paired=entropy(dep.joint[e].sum(0))) for e in within]
        ded = run_ded(model, processor, samples, qcfg, cfg, edges=todo, batch_size=batch_size, seed=s, scope=scope,
                      granularity=granularity, joint_budget=joint_budget)
        for r in ded.rows:
            rows.append(dict(seed=s, H_next=h[r["edge"] + 1], D=d[r["edge"]], **r))
        mine = [r for r in rows if r["seed"] == s]
        fits["H"][s] = fit_line([r["H_next"] for r in mine], [r["rel_ded"] for r in mine])
        fits["D"][s] = fit_line([r["D"] for r in mine], [r["rel_ded"] for r in mine])
    fits["H_pooled"] = fit_line([r["H_next"] for r in rows], [r["rel_ded"] for r in rows])
    fits["D_pooled"] = fit_line([r["D"] for r in rows], [r["rel_ded"] for r in rows])
    return dict(edges=edge_table, rows=rows, fits=fits, spread=dict(H=r2_spread(list(fits["H"].values())),
                                                                    D=r2_spread(list(fits["D"].values()))))


def select_edge(edges: list[int], spec: str = "middle") -> int:
    """One edge: 'middle' (the paper shows LLaVA's 15th of 32 layers) or an index among `edges`."""
    if str(spec) == "middle":
        return edges[(len(edges) - 1) // 2]
    e = int(spec)
    if e not in edges:
        raise QVLMError(f"edge {e} is not a within-part edge of this model", f"pick from {edges}")
    return e


def budget_control(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig, cfg: ReconConfig, edge: int,
                   scope=("llm",), granularity: str = "layer", batch_size: int = 16, seed: int = 0) -> list[dict]:
    """DED of one edge under both joint budgets (module doc (b)): if "total" (the joint arm gets the layer-wise
    arm's total steps) gave a much larger DED than "per_parameter", the budget and not the dependency would drive
    it."""
    out = []
    for jb in JOINT_BUDGETS:
        r = run_ded(model, processor, samples, qcfg, cfg, edges=[edge], batch_size=batch_size, seed=seed, scope=scope,
                    granularity=granularity, joint_budget=jb).rows[0]
        out.append(dict(joint_budget=jb, **{k: r[k] for k in ("edge", "unit", "successor", "e_rtn", "e_layerwise",
                                                              "e_joint", "ded", "rel_ded", "steps_layerwise",
                                                              "steps_joint")}))
    return out
