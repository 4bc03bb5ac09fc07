"""`PackedLinear`: a deployable quantized nn.Linear that stores packed integer weights and calls the Triton kernels.

A Q-VLM (NeurIPS 2024) quantized layer is simulated during the search with fake quantization (`qvlm.core.quant`); for
deployment the same codes and scales are packed (`kernels.pack`) and multiplied with the integer / weight-only
GEMMs. Three modes, picked from (w_bits, a_bits):

    "w4a16"  w_bits <= 4, a_bits == 16   packed int4 weights, float activations        -> kernels.w4a16
    "w4a4"   w_bits <= 4, a_bits <= 4    packed int4 weights, int4 per-token activations -> kernels.w4a4
    "w8a8"   w_bits <= 8, a_bits <= 8    int8 weights, int8 per-token activations       -> kernels.w8a8

Activations are quantized dynamically per token and symmetrically (`kernels.act_quant`), as in `qvlm.core.quant.quantize_act`;
weights per channel (group_size 0) or per group, symmetric or asymmetric, with scale / zero_point either computed
by round-to-nearest or supplied by a calibrated quantizer. The forward output equals
F.linear(fake_quant_act(x), fake_quant_weight(W), bias) up to fp16 / bf16 rounding (see tests/kernels/test_layers.py).

Backend: the Triton kernels run when the input is on CUDA, or on CPU when TRITON_INTERPRET=1 was set before
`kernels` was imported (slow, for correctness checks). Otherwise (CPU, no interpreter) forward falls back to the
plain-torch reference functions (`*_ref`), which compute the same integers and rescale in float64.

References: llm-awq `awq/quantize/qmodule.py::WQLinear.from_linear`; gpt-fast `quantize.py::WeightOnlyInt4Linear`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qvlm.errors import QVLMError
from qvlm.core.quant import check_bits

from ._common import can_launch
from .act_quant import act_quant, act_quant_ref
from .pack import PackedWeight, pack_weight, unpack_weight
from .w4a4 import w4a4_matmul, w4a4_ref
from .w4a16 import w4a16_matmul, w4a16_ref
from .w8a8 import w8a8_matmul, w8a8_ref

MODES = ("w4a16", "w8a8", "w4a4")


def mode_for(w_bits: int, a_bits: int) -> str:
    """The kernel family that runs a (w_bits, a_bits) layer: the smallest containers that hold both codes."""
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if a_bits == 16 and w_bits <= 4:
        return "w4a16"
    if a_bits <= 4 and w_bits <= 4:
        return "w4a4"
    if a_bits <= 8 and w_bits <= 8:
        return "w8a8"
    raise QVLMError(f"no packed kernel for w_bits={w_bits}, a_bits={a_bits}",
                    "use W<=4 A16, W<=4 A<=4 or W<=8 A<=8 (keep other layers as fake-quant QuantLinear)")


class PackedLinear(nn.Module):
    """nn.Linear replacement holding packed weight codes + fp32 scale / zero_point buffers (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int, group_size: int = 0,
                 symmetric: bool = True, bias: bool = True, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.mode = mode_for(w_bits, a_bits)
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size, self.symmetric = w_bits, a_bits, group_size, symmetric
        self.container_bits = 8 if self.mode == "w8a8" else 4
        n_groups = in_features // group_size if group_size else 1
        q_shape = (out_features, in_features // 2) if self.container_bits == 4 else (out_features, in_features)
        q_dtype = torch.uint8 if self.container_bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(q_shape, dtype=q_dtype, device=device))          # codes
        self.register_buffer("scale", torch.ones(out_features, n_groups, device=device))             # (N, G)
        self.register_buffer("zero_point", torch.zeros(out_features, n_groups, device=device))       # (N, G)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, group_size: int = 0, symmetric: bool = True,
                   scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> "PackedLinear":
        """Quantize and pack an nn.Linear; `scale` / `zero_point` (out, n_groups) may come from a calibrated
        quantizer, else round-to-nearest min/max qparams (qvlm.core.quant.weight_qparams) are used."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, w_bits, a_bits, group_size, symmetric,
                    bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        pw = pack_weight(w.float(), w_bits, group_size, symmetric, scale, zero_point,
                         container_bits=layer.container_bits)
        layer.qweight.copy_(pw.qweight)
        layer.scale.copy_(pw.scale)
        layer.zero_point.copy_(pw.zero_point)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def packed_weight(self) -> PackedWeight:
        """The buffers as a PackedWeight (e.g. to dequantize with kernels.pack.unpack_weight)."""
        return PackedWeight(self.qweight, self.scale, self.zero_point, self.w_bits, self.group_size, self.symmetric,
                            self.container_bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) fp32 weight that the kernels effectively multiply with."""
        return unpack_weight(self.packed_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W_hat.T + bias via the Triton kernels (or the torch reference fallback, see module docstring)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                                        # (M, K)
        kernels = can_launch(x2)
        zp = None if self.symmetric else self.zero_point
        if self.mode == "w4a16":
            fn = w4a16_matmul if kernels else w4a16_ref
            y = fn(x2, self.qweight, self.scale, zp, self.symmetric)
        elif self.mode == "w8a8":
            a_q, a_scale = (act_quant if kernels else act_quant_ref)(x2, self.a_bits)
            y = (w8a8_matmul if kernels else w8a8_ref)(a_q, a_scale, self.qweight, self.scale, zp, out_dtype=x.dtype)
        else:                                                                       # w4a4
            a_p, a_scale = (act_quant if kernels else act_quant_ref)(x2, self.a_bits, pack=True)
            fn = w4a4_matmul if kernels else w4a4_ref
            y = fn(a_p, a_scale, self.qweight, self.scale, zp, self.symmetric, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
                f"w_bits={self.w_bits}, a_bits={self.a_bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, bias={self.bias is not None}")
