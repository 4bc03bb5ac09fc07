"""Int4 packing of quantized weights (two codes per byte along the input dimension) and its inverse.

Q-VLM (NeurIPS 2024) quantizes weights with uniform per-channel or per-group grids (`qvlm.core.quant`); to deploy them,
the integer codes are stored compactly: 4-bit codes two per uint8 byte, 8-bit codes as int8. This file does that
(offline, plain torch) and provides a Triton kernel for the inverse (unpacking), with its torch reference.

    pack_int4(q, signed)             (R, K) int codes -> (R, K // 2) uint8   (byte j = code 2j | code 2j+1 << 4)
    unpack_int4(packed, signed)      Triton kernel: (R, K // 2) uint8 -> (R, K) int8
    unpack_int4_ref(packed, signed)  the same in plain torch
    pack_weight(w, w_bits, ...)      float (N, K) weight -> PackedWeight (codes + scale + zero_point), via qvlm.core.quant

Symmetric codes ([-8, 7]) are stored as 4-bit two's complement and sign-extended on unpacking (`signed=True`);
asymmetric codes ([0, 15]) are stored as is (`signed=False`). Scales and zero points stay fp32, shaped
(N, n_groups) exactly as `qvlm.core.quant.quantize_weight` returns them.

References: gpt-fast `quantize.py::group_quantize_tensor` (+ `_convert_weight_to_int4pack`); llm-awq `qmodule`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError
from qvlm.core.quant import check_bits, quantize_weight

from ._common import check_2d, check_launch, unpack_nibbles


# ----------------------------------------------------------------------------------------------- Triton kernel
@triton.jit
def _unpack_int4_kernel(
    p_ptr,                      # *uint8, packed codes (R, KH): byte j = code 2j (low nibble) | code 2j+1 (high)
    q_ptr,                      # *int8, output codes (R, 2 * KH)
    R,                          # number of rows
    KH,                         # number of bytes per row (= K / 2)
    stride_pr, stride_pk,       # strides of the packed input (rows, bytes)
    stride_qr, stride_qk,       # strides of the output (rows, codes)
    SIGNED: tl.constexpr,       # True: sign-extend nibbles to [-8, 7]; False: zero-extend to [0, 15]
    BLOCK_R: tl.constexpr,      # rows per program
    BLOCK_KH: tl.constexpr,     # bytes per program
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                     # (BLOCK_R,)
    offs_j = pid_k * BLOCK_KH + tl.arange(0, BLOCK_KH)                   # (BLOCK_KH,) byte indices
    mask = (offs_r[:, None] < R) & (offs_j[None, :] < KH)                # ragged edges
    p = tl.load(p_ptr + offs_r[:, None] * stride_pr + offs_j[None, :] * stride_pk, mask=mask, other=0)
    lo, hi = unpack_nibbles(p, SIGNED)                                   # (BLOCK_R, BLOCK_KH) int32 each
    q_row = q_ptr + offs_r[:, None] * stride_qr
    tl.store(q_row + (2 * offs_j[None, :]) * stride_qk, lo.to(tl.int8), mask=mask)      # even codes
    tl.store(q_row + (2 * offs_j[None, :] + 1) * stride_qk, hi.to(tl.int8), mask=mask)  # odd codes


def unpack_int4(packed: torch.Tensor, signed: bool, BLOCK_R: int = 16, BLOCK_KH: int = 64) -> torch.Tensor:
    """Triton: (R, K/2) uint8 -> (R, K) int8 codes (sign-extended if `signed`)."""
    check_2d("packed", packed, (None, None), (torch.uint8,))
    check_launch(packed)
    R, KH = packed.shape
    q = torch.empty((R, 2 * KH), dtype=torch.int8, device=packed.device)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(KH, BLOCK_KH))
    _unpack_int4_kernel[grid](packed, q, R, KH, packed.stride(0), packed.stride(1), q.stride(0), q.stride(1),
                              SIGNED=signed, BLOCK_R=BLOCK_R, BLOCK_KH=BLOCK_KH)
    return q


# --------------------------------------------------------------------------------------------- torch reference
def pack_int4(q: torch.Tensor, signed: bool) -> torch.Tensor:
    """(R, K) integer codes -> (R, K/2) uint8, code 2j in the low nibble of byte j and code 2j+1 in the high one."""
    assert q.dim() == 2 and q.shape[1] % 2 == 0, f"pack_int4 needs (R, even K), got {tuple(q.shape)}"
    lo_lim, hi_lim = (-8, 7) if signed else (0, 15)
    qi = q.to(torch.int32)
    assert qi.numel() == 0 or (qi.min() >= lo_lim and qi.max() <= hi_lim), \
        f"codes outside [{lo_lim}, {hi_lim}] cannot be packed as {'signed' if signed else 'unsigned'} int4"
    lo, hi = qi[:, 0::2] & 0xF, qi[:, 1::2] & 0xF                        # (R, K/2) each, 4-bit patterns
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4_ref(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Plain torch inverse of pack_int4: (R, K/2) uint8 -> (R, K) int8."""
    p = packed.to(torch.int32)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    if signed:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8                              # 4-bit two's complement
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)  # interleave: 2j, 2j+1


# ---------------------------------------------------------------------------------------------- packed weights
@dataclass
class PackedWeight:
    """Deployable weight: integer codes in a 4- or 8-bit container, plus fp32 scale / zero_point (N, n_groups).

    For `container_bits == 4`, `qweight` is uint8 (N, K/2) (see `pack_int4`); for 8, int8 (N, K). The dequantized
    weight is (codes - zero_point) * scale per group, exactly `qvlm.core.quant.dequantize_weight`.
    """
    qweight: torch.Tensor        # (N, K/2) uint8 or (N, K) int8
    scale: torch.Tensor          # (N, n_groups) fp32
    zero_point: torch.Tensor     # (N, n_groups) fp32, integer-valued (0 when symmetric)
    w_bits: int
    group_size: int              # 0 = per output channel
    symmetric: bool
    container_bits: int          # 4 (two codes per byte) or 8 (one int8 per code)
    in_features: int


def pack_weight(w: torch.Tensor, w_bits: int, group_size: int = 0, symmetric: bool = True,
                scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None,
                container_bits: int | None = None) -> PackedWeight:
    """Quantize a float (N, K) weight with qvlm.core.quant (or the given calibrated scale/zero_point) and pack it.

    `container_bits` defaults to 4 when w_bits <= 4, else 8. Asymmetric 8-bit codes ([0, 255]) do not fit int8, so
    they are stored shifted by -128 together with zero_point - 128: (q - 128) - (z - 128) = q - z, exactly.
    """
    check_bits(w_bits, "w_bits")
    if w_bits > 8:
        raise QVLMError(f"w_bits={w_bits} cannot be packed", "use w_bits <= 8 (16 means 'keep the float layer')")
    container_bits = container_bits or (4 if w_bits <= 4 else 8)
    if container_bits not in (4, 8) or w_bits > container_bits:
        raise QVLMError(f"w_bits={w_bits} does not fit a {container_bits}-bit container", "use container_bits 4 or 8")
    N, K = w.shape
    if container_bits == 4 and K % 2:
        raise QVLMError(f"int4 packing needs an even input width, got K={K}", "use the 8-bit container")
    if (scale is None) != (zero_point is None):
        raise QVLMError("give both scale and zero_point, or neither", "pass the calibrated quantizer's pair")
    q, scale, zero_point = quantize_weight(w, w_bits, group_size, symmetric, scale, zero_point)   # (N, K) codes
    scale, zero_point = scale.float().contiguous(), zero_point.float().contiguous()             # (N, n_groups)
    if container_bits == 4:
        qweight = pack_int4(q, signed=symmetric)                                                 # (N, K/2) uint8
    elif not symmetric and w_bits == 8:
        qweight = (q.to(torch.int32) - 128).to(torch.int8)                                        # [0,255] -> int8
        zero_point = zero_point - 128
    else:
        qweight = q.to(torch.int8)                                                                # fits int8 as is
    return PackedWeight(qweight.contiguous(), scale, zero_point, w_bits, group_size, symmetric, container_bits, K)


def unpack_weight(pw: PackedWeight) -> torch.Tensor:
    """PackedWeight -> dequantized fp32 (N, K) weight (torch; for checks and the CPU fallback path)."""
    q = unpack_int4_ref(pw.qweight, pw.symmetric) if pw.container_bits == 4 else pw.qweight
    N, K = q.shape
    n_groups = pw.scale.shape[1]
    qg = q.float().reshape(N, n_groups, K // n_groups)                                            # (N, G, gs)
    return ((qg - pw.zero_point[..., None]) * pw.scale[..., None]).reshape(N, K)
