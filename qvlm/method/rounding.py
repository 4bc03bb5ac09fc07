"""Block-wise rounding search over an entropy-guided partition (paper Sec. 3.2: rounding functions are searched
"jointly inside each block and sequentially across blocks").

A partition block G (from qvlm.partition) is a run of consecutive units (linears reading one input) that may
start and end anywhere inside a transformer layer, or span two. For each G, in forward order:

    learned   the AdaRound rounding offsets and activation steps (static step or per-token clip ratio) of every
              QuantLinear in G, jointly, with the shared machinery `qvlm.methods.reconstruct.reconstruct`;
    objective the output discretization error of the BLOCK: the squared error of the outputs of G's LAST unit
              (e.g. q|k|v concatenated, or down_proj), summed over channels, mean over valid tokens; everything
              between G's input and that output (attention, norms, residuals, activations) runs as in the model;
    input     the quantized path: the transformer layer that holds G's first unit is run from its quantized-path
              input, with every earlier linear already frozen at its learned rounding (sequential across blocks);
    target    the FP model's value of the same output on the FP path (BRECQ / QDrop convention).

The sequential driver `qvlm.calib.calibrate` walks transformer layers; a partition block that spans two layers
forces them into one driver unit (`driver_units`: the smallest groups of consecutive layers no block straddles).

Search and apply are separate (R10): `run_rounding` records the DECISIONS (per weight: rounded up or down; the
learned activation step / clip; the step sizes) -> `save_decisions` -> `load_decisions` -> `apply_decisions`
(quantize a fresh model with exactly those decisions, no data needed).

Differences from the official code (docs §1.B4-B5): there, "block partition" only gates running min/max updates and
the "search" is a 7-point clip-ratio grid per layer with a |x|^0.5 loss on one sample; no rounding is learned.

References: BRECQ `quant/block_recon.py`; QDrop; AdaRound (Nagel et al. 2020); docs/qvlm-method.md §5.1(b).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..core.calib import BlockData, calibrate, group_forward, layer_inputs
from ..core.qlinear import QuantLinear, quant_linears, quantize_model
from ..core.reconstruct import ReconConfig, reconstruct
from ..core.units import layer_of
from ..errors import QVLMError
from ..models import llava
from ..utils import load_artifact, save_artifact


# ------------------------------------------------------------------------------------------- structure
def driver_units(block_keys: list[list[str]], layer_keys: list[str]) -> list[list[str]]:
    """Smallest runs of consecutive transformer layers (llava.Block keys, forward order) such that no partition
    block (lists of linear keys) straddles two runs -- the units handed to qvlm.calib.calibrate."""
    pos = {k: i for i, k in enumerate(layer_keys)}
    joined = [False] * max(len(layer_keys) - 1, 0)         # joined[i]: layer i and i+1 in one driver unit
    for blk in block_keys:
        lo, hi = min(pos[layer_of(k)] for k in blk), max(pos[layer_of(k)] for k in blk)
        for i in range(lo, hi):
            joined[i] = True
    out: list[list[str]] = []
    for i, k in enumerate(layer_keys):
        if i and joined[i - 1]:
            out[-1].append(k)                               # a partition block spans layers i-1 and i
        else:
            out.append([k])
    return out


# ------------------------------------------------------------------------------------------- one block
def reconstruct_block(data: BlockData, keys: list[str], last_unit: list[str], cfg: ReconConfig,
                      progress: bool = False) -> dict:
    """Jointly learn rounding + activation steps of the linears `keys` (one partition block inside `data`) on the
    output of its last unit (`last_unit` keys); leaves them frozen. Returns reconstruct()'s stats."""
    ql = dict(data.qlinears())
    layer_pos = {b.key: j for j, b in enumerate(data.blocks)}
    lo, hi = layer_pos[layer_of(keys[0])], layer_pos[layer_of(keys[-1])]
    x_q = layer_inputs(data, lo)                                            # quantized path into layer lo
    x_fp = layer_inputs(data, lo, fp=True)
    fp_out = [data.fp_twin(k) for k in last_unit]
    with torch.no_grad():
        fwd_fp = group_forward(data.fp_blocks[lo:hi + 1], fp_out, data.args, data.kwargs)
        targets = [fwd_fp(x, i) for i, x in enumerate(x_fp)]                  # FP block output on the FP path
    fwd_q = group_forward(data.modules[lo:hi + 1], [ql[k] for k in last_unit], data.args, data.kwargs)
    stats = reconstruct([ql[k] for k in keys], fwd_q, x_q, targets, data.masks, cfg, progress,
                        desc=f"{keys[0]}..{keys[-1]}")
    record = {k: decision(ql[k]) for k in keys}                             # before freeze() drops the logits
    for k in keys:
        ql[k].freeze()
    return dict(stats, keys=list(keys), decisions=record)


def decision(m: QuantLinear) -> dict:
    """The rounding / step decisions of a layer in hard mode: round_up (bool, out x in) if rounding was learned,
    plus its step sizes and any activation step / clip (what apply_decisions needs)."""
    d = {"w_scale": m.w_scale.detach().clone(), "w_zero_point": m.w_zero_point.detach().clone()}
    if m.round_logits is not None:
        d["round_up"] = (m.round_logits.detach() >= 0)
    for name in ("a_scale", "a_zero_point", "a_clip"):        # (reconstruct observes static ranges first)
        t = getattr(m, name)
        if t is not None:
            d[name] = t.detach().clone()
    return d


# ------------------------------------------------------------------------------------------- search
@dataclass
class Decisions:
    """R10 artifact of the rounding search: per linear key, its decisions; plus the config and per-block stats."""
    config: dict
    layers: dict = field(default_factory=dict)          # {linear key: decision dict}
    blocks: list = field(default_factory=list)          # [{keys, loss_rtn, loss, reverted, iters, seconds}]


def run_rounding(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig, block_keys: list[list[str]],
                 cfg: ReconConfig = ReconConfig(), units: list[list[str]] | None = None, batch_size: int = 16,
                 progress: bool = False, meta: dict | None = None) -> Decisions:
    """Quantize `model` IN PLACE with block-wise learned rounding over the partition `block_keys` (lists of linear
    keys in forward order); `units` are the linear units (to find each block's last unit). Returns the decisions."""
    if qcfg.weight_format != "int":
        raise QVLMError("learned rounding needs weight_format 'int'", "use --method rtn for NF4 weights")
    layer_keys = [b.key for b in llava.blocks(model, qcfg.scope)]
    covered = [k for blk in block_keys for k in blk]
    expected = [i.key for i in llava.linear_layers(model, qcfg.scope)]
    if covered != expected:
        raise QVLMError("the partition does not cover the scoped linear layers in forward order",
                        "build it from the same model and scope (qvlm.partition.run_partition)")
    unit_of = {k: tuple(u) for u in (units or [[k] for k in expected]) for k in u}
    out = Decisions(dict(asdict(cfg), quant=asdict(qcfg), n_calib=len(samples), **(meta or {})))

    def unit_fn(data: BlockData) -> dict:
        mine = {k for k, _ in data.qlinears()}
        stats = {}
        for blk in block_keys:
            if blk[0] in mine:
                s = reconstruct_block(data, blk, list(unit_of[blk[-1]]), cfg, progress)
                out.layers.update(s.pop("decisions"))
                out.blocks.append(s)
                stats[f"{blk[0]}..{blk[-1]}"] = {k: v for k, v in s.items() if k != "keys"}
        return stats

    out.config["driver_units"] = driver_units(block_keys, layer_keys)
    calibrate(model, processor, samples, qcfg, unit_fn, batch_size=batch_size, units=out.config["driver_units"],
              progress=progress)
    return out


def _key_of(model: nn.Module, name: str, qcfg: QuantConfig) -> str | None:
    """Qualified module name -> linear key ('llm.3.mlp.down_proj')."""
    for b in llava.blocks(model, qcfg.scope):
        if name.startswith(b.name + "."):
            return f"{b.key}.{name[len(b.name) + 1:]}"
    return None


# ------------------------------------------------------------------------------------------- apply
def save_decisions(dec: Decisions, path) -> Path:
    """Write `dec` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("rounding", dec, path)


def load_decisions(path) -> Decisions:
    """Inverse of save_decisions."""
    return load_artifact("rounding", Decisions, path, "qvlm.rounding.save_decisions")


@torch.no_grad()
def apply_decisions(model: nn.Module, dec: Decisions, qcfg: QuantConfig | None = None) -> nn.Module:
    """Quantize an FP `model` IN PLACE with recorded decisions (no data): swap in QuantLinears, set each layer's
    steps, rounding directions and activation steps, and freeze."""
    qcfg = qcfg or QuantConfig(**dec.config["quant"])
    infos = {i.key: i for i in llava.linear_layers(model, qcfg.scope)}
    missing = [k for k in dec.layers if k not in infos]
    if missing:
        raise QVLMError(f"rounding decisions name {len(missing)} layers this model lacks (first: {missing[0]})",
                        "apply them to the model (and scope) they were searched on")
    quantize_model(model, qcfg)
    qls = {}
    for name, m in quant_linears(model):
        qls[_key_of(model, name, qcfg)] = m
    for key, d in dec.layers.items():
        m = qls[key]
        m.w_scale, m.w_zero_point = d["w_scale"].to(m.weight.device), d["w_zero_point"].to(m.weight.device)
        for name in ("a_scale", "a_zero_point", "a_clip"):
            if name in d:
                m.set_tensor(name, d[name].to(m.weight.device))
        if "round_up" in d:
            m.set_tensor("round_logits", torch.where(d["round_up"], 1.0, -1.0).to(m.weight.device))
            m.round_mode = "hard"
        m.freeze()
    for _, m in quant_linears(model):
        m.freeze()                                                             # layers without decisions: RTN
    return model
