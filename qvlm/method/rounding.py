"""Block-wise rounding search over a partition (paper Sec. 3.2: rounding functions are searched "jointly inside each
block and sequentially across blocks").

Two granularities of block, chosen by the partition (qvlm.method.partition):

  layer (default)  a block is a run of consecutive TRANSFORMER LAYERS of one part (vision layers, the projector, or
                   decoder layers), as the paper measures entropy and dependency per LLaVA layer and the official
                   code refreshes every 3 decoder layers. The block is one unit of the sequential driver
                   (qvlm.core.calib.calibrate), and its objective is the block's RESIDUAL OUTPUT: the hidden states
                   leaving its last layer, squared error summed over channels, mean over valid tokens.
  unit (option)    a block is a run of consecutive linear units (linears reading one input; q|k|v, o, gate|up,
                   down) that may start and end inside a layer; its objective is the output of its LAST unit (e.g.
                   q|k|v concatenated, or down_proj), everything in between running as in the model.

In both, for each block in forward order:
    learned   AdaRound rounding offsets and activation quantizers (static step or clip ratio, one per input tensor)
              of every QuantLinear in the block, jointly, with qvlm.core.reconstruct.reconstruct;
    input     the quantized path: every earlier block is already frozen at its learned rounding;
    target    the FP model's value on the FP path (BRECQ / QDrop convention);
    steps     `iters` per block, or with a fixed total budget (ReconConfig.budget > 0) the budget split over the
              blocks in proportion to their number of linears, so partitions can be compared at equal total steps
              (budget_unit "steps") or at equal compute, the layer-wise search's linear-steps ("compute";
              qvlm.core.reconstruct.budget_steps).

Search and apply are separate: `run_rounding` records the DECISIONS (per weight rounded up or down, the step sizes,
the learned activation tensors, which linears share an activation quantizer) -> `save_decisions` ->
`load_decisions` -> `apply_decisions` (quantize a fresh FP model with exactly those decisions, no data).

Differences from the official code (docs/method.md): there, "block partition" only gates running min/max updates
and the "search" is a 7-point clip-ratio grid per layer with a |x|^0.5 loss on one sample; no rounding is learned.

References: BRECQ `quant/block_recon.py`; QDrop; AdaRound (Nagel et al. 2020).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..core.calib import BlockData, calibrate, group_forward, layer_inputs
from ..core.checkpoint import shared_groups
from ..core.qlinear import QuantLinear, quant_linears, quantize_model, share_act_quantizer
from ..core.reconstruct import ReconConfig, budget_steps, reconstruct
from ..core.units import layer_of
from ..errors import QVLMError
from ..models import llava
from ..utils import load_artifact, save_artifact

GRANULARITIES = ("layer", "unit")


# ------------------------------------------------------------------------------------------- structure
def driver_units(block_keys: list[list[str]], layer_keys: list[str]) -> list[list[str]]:
    """Smallest runs of consecutive transformer layers (llava.Block keys, forward order) such that no block of
    linear keys straddles two runs -- the driver units of the unit granularity."""
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


def unit_key(layers: list[str]) -> str:
    """The driver's key of a run of layers: 'llm.3' or 'llm.3-5'."""
    return layers[0] if len(layers) == 1 else f"{layers[0]}-{layers[-1].split('.')[-1]}"


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


# ------------------------------------------------------------------------------------------- one block
def reconstruct_units(data: BlockData, keys: list[str], last_unit: list[str], cfg: ReconConfig,
                      progress: bool = False) -> dict:
    """Unit granularity: jointly learn the linears `keys` (one block inside `data`) on the output of its last unit
    (`last_unit` keys); leaves them frozen. Returns reconstruct()'s stats + the decisions."""
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


def reconstruct_layers(data: BlockData, cfg: ReconConfig, progress: bool = False) -> dict:
    """Layer granularity: jointly learn every linear of the driver unit (the block's layers) on the block's
    residual output (data.forward: the hidden states leaving its last layer). Stats + decisions."""
    qls = data.qlinears()
    stats = reconstruct([m for _, m in qls], lambda x, i: data.forward(i, x), data.inputs, data.targets, data.masks,
                        cfg, progress, desc=data.key)
    return dict(stats, keys=[k for k, _ in qls], decisions={k: decision(m) for k, m in qls},
                shared=[[k for k in g] for g in shared_groups(qls)])


# ------------------------------------------------------------------------------------------- search
@dataclass
class Decisions:
    """Artifact of the rounding search: per linear key, its decisions; plus the config and per-block stats."""
    config: dict
    layers: dict = field(default_factory=dict)          # {linear key: decision dict}
    blocks: list = field(default_factory=list)          # [{keys, loss_rtn, loss, reverted, iters, seconds}]
    shared: list = field(default_factory=list)          # [[linear key, ...]] sharing one activation quantizer


def run_rounding(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig, block_keys: list[list[str]],
                 cfg: ReconConfig = ReconConfig(), *, granularity: str = "layer", units: list[list[str]] | None = None,
                 batch_size: int = 16, progress: bool = False, meta: dict | None = None) -> Decisions:
    """Quantize `model` IN PLACE with block-wise learned rounding over the partition `block_keys` -- lists of
    transformer-layer keys ('llm.3') with granularity "layer", of linear keys with "unit" (then `units`, the
    linear units, tell each block's last unit). Returns the decisions."""
    if granularity not in GRANULARITIES:
        raise QVLMError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
    if qcfg.weight_format != "int":
        raise QVLMError("learned rounding needs weight_format 'int'", "use --method rtn for NF4 weights")
    layer_keys = [b.key for b in llava.blocks(model, qcfg.scope)]
    covered = [k for blk in block_keys for k in blk]
    out = Decisions(dict(asdict(cfg), quant=asdict(qcfg), n_calib=len(samples), granularity=granularity,
                         **(meta or {})))
    n_lin = {b.key: sum(isinstance(m, nn.Linear) for m in b.module.modules()) for b in llava.blocks(model, qcfg.scope)}
    if granularity == "layer":
        if covered != layer_keys:
            raise QVLMError("the partition does not cover the scoped transformer layers in forward order",
                            "build it from the same model and scope (qvlm.method.partition)")
        steps = dict(zip((unit_key(b) for b in block_keys),
                         budget_steps(cfg, [sum(n_lin[k] for k in b) for b in block_keys], list(n_lin.values()))))

        def unit_fn(data: BlockData) -> dict:
            s = reconstruct_layers(data, replace(cfg, iters=steps[data.key]), progress)
            out.layers.update(s.pop("decisions"))
            out.shared += s.pop("shared")
            out.blocks.append(s)
            return {k: v for k, v in s.items() if k != "keys"}

        driver = [list(b) for b in block_keys]
    else:
        expected = [i.key for i in llava.linear_layers(model, qcfg.scope)]
        if covered != expected:
            raise QVLMError("the partition does not cover the scoped linear layers in forward order",
                            "build it from the same model and scope (qvlm.method.partition)")
        unit_of = {k: tuple(u) for u in (units or [[k] for k in expected]) for k in u}
        steps = dict(zip((b[0] for b in block_keys), budget_steps(cfg, [len(b) for b in block_keys], list(n_lin.values()))))

        def unit_fn(data: BlockData) -> dict:
            mine = {k for k, _ in data.qlinears()}
            stats = {}
            for blk in block_keys:
                if blk[0] in mine:
                    s = reconstruct_units(data, blk, list(unit_of[blk[-1]]), replace(cfg, iters=steps[blk[0]]),
                                          progress)
                    out.layers.update(s.pop("decisions"))
                    out.blocks.append(s)
                    stats[f"{blk[0]}..{blk[-1]}"] = {k: v for k, v in s.items() if k != "keys"}
            out.shared += shared_groups(data.qlinears())
            return stats

        driver = driver_units(block_keys, layer_keys)
    out.config["driver_units"] = driver
    calibrate(model, processor, samples, qcfg, unit_fn, batch_size=batch_size, units=driver, progress=progress)
    return out


# ------------------------------------------------------------------------------------------- apply
def save_decisions(dec: Decisions, path) -> Path:
    """Write `dec` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("rounding", dec, path)


def load_decisions(path) -> Decisions:
    """Inverse of save_decisions."""
    return load_artifact("rounding", Decisions, path, "qvlm.method.rounding.save_decisions")


def linear_keys(model: nn.Module, qcfg: QuantConfig) -> dict[str, QuantLinear]:
    """{linear key ('llm.3.mlp.down_proj'): QuantLinear} of a quantized model."""
    names = {id(m): n for n, m in quant_linears(model)}
    return {i.key: i.module for i in llava.linear_layers(model, qcfg.scope) if id(i.module) in names}


@torch.no_grad()
def apply_decisions(model: nn.Module, dec: Decisions, qcfg: QuantConfig | None = None) -> nn.Module:
    """Quantize an FP `model` IN PLACE with recorded decisions (no data): swap in QuantLinears, share the activation
    quantizers the search shared, set each layer's steps, rounding directions and activation tensors, freeze."""
    qcfg = qcfg or QuantConfig(**dec.config["quant"])
    infos = {i.key for i in llava.linear_layers(model, qcfg.scope)}
    missing = [k for k in dec.layers if k not in infos]
    if missing:
        raise QVLMError(f"rounding decisions name {len(missing)} layers this model lacks (first: {missing[0]})",
                        "apply them to the model (and scope) they were searched on")
    quantize_model(model, qcfg)
    qls = linear_keys(model, qcfg)
    for group in dec.shared:
        share_act_quantizer([qls[k] for k in group])
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
