"""Quantization methods, registered by name, and `quantize()`, the one entry point notebooks, the CLI and bench call.

    qmodel, info = qvlm.methods.quantize(model, processor, "gptq", QuantConfig(w_bits=4, a_bits=16),
                                         CalibConfig(n_calib=64), iters=..., **method_knobs)

Methods (one module each; knobs in a dataclass beside each, every default written once there):

    fp           full precision, the reference (nothing is quantized)
    rtn          round-to-nearest weights (per channel / group), activations dynamic or calibrated
    smoothquant  SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then RTN
    gptq         GPTQ (Frantar et al. 2023): Hessian-aware sequential weight rounding (+ activation quant)
    awq          AWQ (Lin et al. 2024): per-channel scale search on the block output + weight clip search
    quarot       QuaRot (Ashkboos et al. 2024): the `rotate` transform, then GPTQ weights + RTN activations
    mbq          MBQ (Li et al. 2025): AWQ's scale search with image / text token errors weighted by the loss gradient
    adaround     AdaRound (Nagel et al. 2020): learned rounding per layer (QDrop option)
    brecq        BRECQ (Li et al. 2021): learned rounding + activation step reconstructed per block
    qvlm         Q-VLM (Wang et al. 2024), the paper's method (pipeline in qvlm.method)

A method is a `qvlm.methods.base.Method`: a config dataclass plus `quantize_unit(data, qcfg, cfg) -> stats`,
called by the sequential driver `qvlm.core.calib.calibrate` on each unit (one block, or consecutive blocks a method
groups through `units`). A method that needs full control (Q-VLM's extra passes) provides `run`.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from ..config import CalibConfig, QuantConfig
from ..core.calib import calibrate
from ..core.checkpoint import FINGERPRINT_ATTR, fingerprint
from ..core.cost import peak_memory
from ..core.qlinear import check_model, freeze_model, quantize_model
from ..core.reconstruct import allocate_steps, budget_steps
from ..data import calibration_set
from ..errors import QVLMError
from ..models import check_quant_config, llava
from ..utils import seed_everything
from . import adaround, awq, brecq, fp, gptq, mbq, quarot, qvlm, rtn, smoothquant
from .base import Method

# Table order: the reference, the baselines from simplest to strongest, then the paper's method.
METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (fp, rtn, smoothquant, gptq, awq, quarot, mbq, adaround,
                                                                  brecq, qvlm)}


def register(method: Method) -> Method:
    """Add a method to METHODS (by name), e.g. an experiment's own variant."""
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method called `name` (QVLMError listing the known ones otherwise)."""
    if name not in METHODS:
        raise QVLMError(f"unknown method {name!r}", f"use one of {', '.join(METHODS)}")
    return METHODS[name]


def _check_weights(model, qcfg: QuantConfig) -> None:
    for blk in llava.blocks(model, qcfg.scope):
        for name, p in blk.module.named_parameters():
            if not torch.isfinite(p).all():
                raise QVLMError(f"non-finite (NaN/Inf) weights in block {blk.key} ({name})",
                                "restore the checkpoint; quantization needs finite weights")


def budget_plan(model, qcfg: QuantConfig, cfg, units: list[list[str]] | None = None,
                group: str = "unit") -> dict[str, int] | None:
    """Fixed-budget mode (a config with `budget` > 0): {driver unit key: its steps}, the total split over the units
    in proportion to their number of linears (qvlm.core.reconstruct.budget_steps, in `cfg.budget_unit`). `group`:
    what the method optimises jointly -- "unit" (BRECQ: the unit's linears together) or "linear" (AdaRound: one
    at a time, which the compute unit needs to know). None = `iters` per group."""
    if not getattr(cfg, "budget", 0):
        return None
    blocks = llava.blocks(model, qcfg.scope)
    groups = units or [[b.key] for b in blocks]
    n_lin = {b.key: sum(isinstance(x, nn.Linear) for x in b.module.modules()) for b in blocks}
    keys = [g[0] if len(g) == 1 else f"{g[0]}-{g[-1].split('.')[-1]}" for g in groups]
    sizes = [sum(n_lin[k] for k in g) for g in groups]
    if group == "linear":                       # the total over single linears, then split back over the units
        total = sum(budget_steps(cfg, [1] * sum(sizes), list(n_lin.values())))
        return dict(zip(keys, allocate_steps(total, sizes)))
    return dict(zip(keys, budget_steps(cfg, sizes, list(n_lin.values()))))


def quantize(model, processor, method: str = "rtn", qcfg: QuantConfig | None = None,
             calib_cfg: CalibConfig | None = None, *, dataset: str = "tiny", progress: bool = True, **knobs):
    """Quantize `model` IN PLACE with `method`; returns (model, info).

    info: method, knobs (the method config), quant_config, calib, search_seconds (wall time of calibration +
    search, excluding model loading and evaluation), peak_memory_bytes and peak_memory_kind (see
    qvlm.core.cost.peak_memory), blocks (per-unit stats, e.g. reconstruction losses)."""
    qcfg = qcfg or QuantConfig()
    calib_cfg = calib_cfg or CalibConfig()
    m = get(method)
    cfg = m.make_config(**knobs)
    if m.name == "fp":
        qcfg = dataclasses.replace(qcfg, w_bits=16, a_bits=16)
    check_model(model, qcfg)
    check_quant_config(model, qcfg)
    _check_weights(model, qcfg)
    if not hasattr(model, FINGERPRINT_ATTR):                # taken before a transform when there is one (run_one):
        setattr(model, FINGERPRINT_ATTR, fingerprint(model))  # save_quantized then stores what either changed
    seed_everything(calib_cfg.seed)
    static_acts = qcfg.a_bits < 16 and qcfg.a_granularity == "tensor"
    used_data = m.name != "fp" and (m.needs_data or static_acts or m.run is not None)
    with peak_memory(llava.model_device(model)) as mem:
        t0 = time.perf_counter()
        if m.name == "fp":
            stats = {}
        elif used_data:
            samples = calibration_set(dataset, calib_cfg.n_calib, calib_cfg.seed)
            if m.run is not None:
                stats = m.run(model, processor, samples, qcfg, calib_cfg, cfg, progress, dataset=dataset)
            else:
                unit_fn = (lambda data: m.quantize_unit(data, qcfg, cfg)) if m.quantize_unit else None
                units = m.units(model, qcfg, cfg) if m.units else None
                stats = calibrate(model, processor, samples, qcfg, unit_fn, batch_size=calib_cfg.batch_size,
                                  units=units, progress=progress, unit_iters=budget_plan(model, qcfg, cfg, units, m.group))
        else:                                           # data-free: RTN weights, dynamic activations
            quantize_model(model, qcfg)
            freeze_model(model)
            stats = {}
        seconds = time.perf_counter() - t0
    info = dict(method=m.name, knobs=dataclasses.asdict(cfg), quant_config=dataclasses.asdict(qcfg),
                w_bits=qcfg.w_bits, a_bits=qcfg.a_bits, group_size=qcfg.group_size,
                calib=dataclasses.asdict(calib_cfg) if used_data else None, dataset=dataset,
                search_seconds=seconds, peak_memory_bytes=mem["bytes"], peak_memory_kind=mem["kind"], blocks=stats)
    return model, info
