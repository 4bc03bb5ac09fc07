"""Deployment step 2 (optional, for serving): one GEMM per input tensor -- fused q|k|v and gate|up.

The linears that read one tensor share ONE activation quantizer in every method (`qvlm.core.qlinear.
share_act_quantizer`), so their packed layers quantize that tensor to the same codes. `fuse_shared_inputs`
concatenates their packed weights along the output dimension into one DeployedLinear: the activation is quantized
once and one GEMM launch computes all members (at decode, M = 1, three small GEMMs become one wider one):

    model = deploy(model)
    fuse_shared_inputs(model, lambda: model(**inputs))   # in place; one traced forward finds who reads what
    # save_packed refuses a fused model: save first, fuse after load_packed

The groups are found by tracing one real forward (`qvlm.core.hooks.same_input_groups`: which packed layers receive
the same tensor object), so no layer name is assumed and data-free methods (RTN: stateless per-token quantizers,
nothing shared to record) fuse too.

Each member becomes a `FusedSlice`, so the HF modules still call q_proj(x), k_proj(x), v_proj(x). The first call
with a tensor runs the fused layer and keeps its output until every member has taken its column slice; a call with
another tensor (or the same tensor modified in place) recomputes. The output is the unfused one: the same activation
codes, the same int32 accumulators per output column and the same per-column rescale, so w4a4 / w8a8 agree bit
for bit; w4a16's float GEMM may sum a wider tile in another order (fp32 roundoff; tests/unit/test_fuse.py).

Members fuse only when everything but the weights is identical: mode, bits, group size, symmetry, bias presence,
activation quantizer and its tensors (clip, static step), online rotation and smoothing scale. Groups that differ
stay unfused and are reported.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.hooks import same_input_groups
from ..core.qlinear import set_module
from ..errors import QVLMError
from .layer import ACT_TENSORS, DeployedLinear

SPEC_KEYS = ("in_features", "w_bits", "a_bits", "group_size", "symmetric", "mode", "act", "a_granularity",
             "input_transform")


class FusedGroup:
    """One fused DeployedLinear shared by its members, plus the output of the last input tensor (see the module
    docstring). Not an nn.Module: the layer is registered once, under the first member's FusedSlice."""

    def __init__(self, layer: DeployedLinear, widths: list[int]):
        self.layer = layer
        self.bounds = [(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(widths))]
        self._x, self._version, self._y, self._pending = None, -1, None, set()

    def output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member i's output for input x: a column slice of the fused output (computed once per input tensor)."""
        if self._x is not x or self._version != x._version or i not in self._pending:
            self._y = self.layer(x)
            self._x, self._version, self._pending = x, x._version, set(range(len(self.bounds)))
        self._pending.discard(i)
        a, b = self.bounds[i]
        y = self._y[..., a:b].contiguous()
        if not self._pending:                                     # every member served: free the cache
            self._x = self._y = None
        return y


class FusedSlice(nn.Module):
    """Stands where one member linear was; returns its columns of the group's fused GEMM."""

    def __init__(self, group: FusedGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        self.index, self.in_features, self.out_features = index, in_features, out_features
        if index == 0:
            self.fused = group.layer                              # registered once (state_dict, .to(), device)
        self._group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(x, self.index)

    def extra_repr(self) -> str:
        a, b = self._group.bounds[self.index]
        return f"columns {a}:{b} of a fused GEMM of {len(self._group.bounds)} linears"


def _signature(m: DeployedLinear) -> tuple:
    """Everything that must be identical for members to share one fused layer (all but the weights)."""
    spec = m.spec()
    tensors = tuple(None if getattr(m, n) is None else tuple(getattr(m, n).detach().flatten().tolist())
                    for n in ACT_TENSORS)
    return tuple(spec[k] for k in SPEC_KEYS) + (m.bias is not None, tensors)


def fused_layer(members: list[DeployedLinear]) -> DeployedLinear:
    """One DeployedLinear whose output columns are the members' outputs side by side (weights concatenated along N)."""
    first = members[0]
    bias = first.bias is not None
    layer = DeployedLinear(first.in_features, sum(m.out_features for m in members), first.w_bits, first.a_bits,
                           first.group_size, first.symmetric, bias=bias, dtype=first.bias.dtype if bias else torch.float16,
                           device=first.qweight.device, act=first.act, a_granularity=first.a_granularity,
                           input_transform=first.input_transform)
    layer.qweight = torch.cat([m.qweight for m in members])
    layer.scale = torch.cat([m.scale for m in members])
    layer.zero_point = (None if first.zero_point is None else torch.cat([m.zero_point for m in members]))
    layer.bias = torch.cat([m.bias for m in members]) if bias else None
    for name in ACT_TENSORS:                                      # identical in every member (_signature)
        if getattr(first, name) is not None:
            layer.register_buffer(name, getattr(first, name).clone())
    return layer


def shared_input_groups(model: nn.Module, forward) -> list[list[str]]:
    """Names of the packed layers that receive one input tensor during `forward()` (a zero-argument callable running
    one forward pass of `model`), groups of two or more, forward order."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DeployedLinear)}
    if not layers:
        raise QVLMError("the model has no packed layers", "call qvlm.deploy.deploy(model) first")
    return [g for g in same_input_groups(layers, forward) if len(g) > 1]


def fuse_shared_inputs(model: nn.Module, forward=None, groups: list[list[str]] | None = None) -> dict:
    """Replace each group of packed linears that read one tensor by FusedSlice views of one fused GEMM, in place.
    The groups are traced on `forward()` (see shared_input_groups) or given (`groups`, e.g. traced on another copy
    of the same packed model). Returns {"fused": [[names]], "unfused": {first name: reason}}."""
    if is_fused(model):
        raise QVLMError("the model is already fused", "fuse once, after deploy / load_packed")
    if groups is None:
        if forward is None:
            raise QVLMError("no groups and no forward pass to trace them", "pass forward=lambda: model(**inputs)")
        groups = shared_input_groups(model, forward)
    fused, unfused = [], {}
    for names in groups:
        members = [model.get_submodule(n) for n in names]
        if not all(isinstance(m, DeployedLinear) for m in members):
            unfused[names[0]] = "not every member is a packed layer"
            continue
        if len({_signature(m) for m in members}) > 1:
            unfused[names[0]] = "members differ in more than their weights (bits, activation quantizer, scales)"
            continue
        group = FusedGroup(fused_layer(members), [m.out_features for m in members])
        for i, (name, m) in enumerate(zip(names, members)):
            set_module(model, name, FusedSlice(group, i, m.in_features, m.out_features))
        fused.append(list(names))
    model.qvlm_deploy = {**getattr(model, "qvlm_deploy", {}), "fused": fused}
    return dict(fused=fused, unfused=unfused)


def is_fused(model: nn.Module) -> bool:
    """True when some packed layers were replaced by FusedSlice views (fuse_shared_inputs)."""
    return any(isinstance(m, FusedSlice) for m in model.modules())
