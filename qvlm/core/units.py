"""Units: consecutive quantized linears that read the SAME input tensor (q|k|v, gate|up, DINOv2's query|key|value).

A unit's members quantize one activation, so they have one entropy, one activation quantizer (an integer GEMM
fused over q|k|v quantizes its input once) and are never separated by a partition boundary. Units are found by
tracing, on one real forward, which linears receive the same tensor object: no layer name or width is assumed.

    units = find_units(model, processor, sample, scope)   -> [Unit] in forward order
    unit_name(["llm.0.self_attn.q_proj", "llm.0.self_attn.k_proj"]) -> "llm.0.q_proj+k_proj"
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import data as qdata
from ..config import SCOPES
from ..errors import QVLMError
from ..models import llava
from .hooks import InputTap, model_inputs


@dataclass
class Unit:
    """Consecutive linears of one transformer layer that read one input tensor (see the module docstring)."""
    index: int
    keys: list                # LinearInfo.key of each member, forward order
    part: str                 # "vision" | "projector" | "llm"
    block: int                # transformer-layer index within the part
    width: int                # input features

    @property
    def name(self) -> str:
        return unit_name(self.keys)

    @property
    def layer(self) -> str:
        """The transformer layer holding the unit, as a llava.Block key ('llm.3')."""
        return f"{self.part}.{self.block}"


def unit_name(keys: list[str]) -> str:
    """['llm.0.self_attn.q_proj', 'llm.0.self_attn.k_proj'] -> 'llm.0.q_proj+k_proj' (a unit's display name)."""
    part, block, _ = keys[0].split(".", 2)
    return f"{part}.{block}.{'+'.join(k.rsplit('.', 1)[-1] for k in keys)}"


def layer_of(key: str) -> str:
    """'llm.3.mlp.down_proj' -> 'llm.3' (the transformer layer, = llava.Block.key)."""
    part, idx, _ = key.split(".", 2)
    return f"{part}.{idx}"


@torch.no_grad()
def find_units(model: nn.Module, processor, sample: dict, scope=SCOPES) -> list[Unit]:
    """Group `llava.linear_layers(model, scope)` into Units by tracing which linears receive the same input tensor
    object on one forward pass of `sample` (an image sample, so the vision tower runs)."""
    infos = llava.linear_layers(model, scope)
    seen: dict[str, torch.Tensor] = {}
    with InputTap({i.key: i.module for i in infos}, lambda k, x: seen.setdefault(k, x)):
        model(**model_inputs(model, qdata.collate([sample], processor)))
    missing = [i.key for i in infos if i.key not in seen]
    if missing:
        raise QVLMError(f"{len(missing)} linear layers never ran on the probe sample (first: {missing[0]})",
                        "use a calibration sample with an image so the vision tower runs")
    units: list[Unit] = []
    for info in infos:
        last = units[-1] if units else None
        if last is not None and seen[info.key] is seen[last.keys[-1]]:
            last.keys.append(info.key)                            # same input tensor: same unit
        else:
            units.append(Unit(len(units), [info.key], info.part, info.block, info.module.in_features))
    return units
