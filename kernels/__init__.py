"""Triton kernels for deploying Q-VLM quantized layers, each beside a plain-torch reference (`*_ref`).

Read in order: `pack` (int4 layout) -> `act_quant` (per-token activation codes) -> `w4a16` (weight-only GEMM) ->
`w8a8` (int8 x int8 -> int32) -> `w4a4` (packed int4, unpacked to int8 MMA) -> `hadamard` (QuaRot's online
rotation of the down_proj input, optionally fused with act_quant) -> `layers.PackedLinear`.

Set TRITON_INTERPRET=1 *before* importing this package to run the kernels on CPU (correctness only; see
tests/kernels). Without CUDA and without the interpreter the wrappers raise, and PackedLinear falls back to the
references.
"""
from ._common import INTERPRET, can_launch
from .act_quant import act_quant, act_quant_ref
from .hadamard import hadamard, hadamard_act_quant, hadamard_ref
from .hadamard import supported as hadamard_supported
from .layers import MODES, PackedLinear, mode_for
from .pack import PackedWeight, pack_int4, pack_weight, unpack_int4, unpack_int4_ref, unpack_weight
from .w4a4 import w4a4_int32, w4a4_int32_ref, w4a4_matmul, w4a4_ref
from .w4a16 import w4a16_matmul, w4a16_ref
from .w8a8 import w8a8_int32, w8a8_int32_ref, w8a8_matmul, w8a8_ref

__all__ = [
    "INTERPRET", "can_launch", "MODES", "PackedLinear", "mode_for",
    "act_quant", "act_quant_ref",
    "hadamard", "hadamard_act_quant", "hadamard_ref", "hadamard_supported",
    "PackedWeight", "pack_int4", "pack_weight", "unpack_int4", "unpack_int4_ref", "unpack_weight",
    "w4a16_matmul", "w4a16_ref",
    "w8a8_matmul", "w8a8_ref", "w8a8_int32", "w8a8_int32_ref",
    "w4a4_matmul", "w4a4_ref", "w4a4_int32", "w4a4_int32_ref",
]
