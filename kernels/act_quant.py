"""Dynamic per-token activation quantization (symmetric) -> int8 codes, or int4 codes packed two per byte.

Q-VLM (NeurIPS 2024) quantizes activations per token with a uniform symmetric grid (`qvlm.core.quant.quantize_act`):
    scale_m = max(absmax_k |x_mk| / qmax, 1e-8),   q_mk = clamp(round(x_mk / scale_m), -qmax - 1, qmax)
with qmax = 2^(a_bits-1) - 1. This kernel computes exactly those codes and scales (bit-for-bit: fp32 math,
IEEE division via `tl.math.div_rn`, round-half-to-even like `torch.round`), so the integer GEMMs downstream
(`w8a8.py`, `w4a4.py`) see the same integers as the reference.

    act_quant(x, a_bits, pack)      Triton: (..., K) float -> codes (..., K) int8 or (..., K/2) uint8, scale (..., 1) fp32
    act_quant_ref(x, a_bits, pack)  the same in plain torch

Each program owns BLOCK_M tokens and makes two passes over K: the first finds the absmax of each row, the second
quantizes (and packs) it. NaN inputs are not checked here (that would cost a device sync); `qvlm.core.quant` asserts.

References: Triton tutorial 02-fused-softmax (row-wise reductions); SmoothQuant/QuaRot per-token quantizers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError

from ._common import INTERPRET, check_launch, pack_nibbles, round_half_even
from .pack import pack_int4

EPS = 1e-8          # the floor on the step size, same value as qvlm.core.quant._EPS (an all-zero token keeps scale > 0)


@triton.jit
def _act_quant_kernel(
    x_ptr,                      # *fp16/bf16/fp32, activations (M, K)
    q_ptr,                      # *int8 codes (M, K), or *uint8 packed int4 codes (M, K/2) when PACK
    scale_ptr,                  # *fp32, per-token scale (M,)
    M,                          # number of tokens (rows)
    K,                          # number of channels (columns of x)
    stride_xm, stride_xk,       # strides of x
    stride_qm, stride_qk,       # strides of the codes (in elements: codes, or bytes when PACK)
    QMAX: tl.constexpr,         # 2^(a_bits-1) - 1: largest code; the smallest is -QMAX - 1
    EPS: tl.constexpr,          # floor on the scale
    PACK: tl.constexpr,         # True: write int4 codes two per byte (needs a_bits <= 4 and even K)
    BLOCK_M: tl.constexpr,      # tokens per program
    BLOCK_K: tl.constexpr,      # channels per loop step (an even number)
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # (BLOCK_M,)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm                         # (BLOCK_M, 1) row pointers

    # pass 1: absmax of each token over all K channels (masked entries load 0, which never wins)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), EPS)          # (BLOCK_M,) fp32, = absmax / qmax
    tl.store(scale_ptr + offs_m, scale, mask=mask_m)

    # pass 2: codes = clamp(round(x / scale)), the division done in IEEE fp32 like torch
    if PACK:
        for k0 in range(0, K, BLOCK_K):
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)                # (BLOCK_K/2,) byte index j <-> codes 2j, 2j+1
            mask = mask_m[:, None] & (2 * offs_j[None, :] < K)
            x_lo = tl.load(x_rows + (2 * offs_j[None, :]) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_rows + (2 * offs_j[None, :] + 1) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            q_lo = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x_lo, scale[:, None])), -QMAX - 1), QMAX)
            q_hi = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x_hi, scale[:, None])), -QMAX - 1), QMAX)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_j[None, :] * stride_qk, pack_nibbles(q_lo, q_hi),
                     mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, scale[:, None])), -QMAX - 1), QMAX)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, q.to(tl.int8), mask=mask)


def _check(x: torch.Tensor, a_bits: int, pack: bool) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QVLMError(f"act_quant: unsupported dtype {x.dtype}", "use fp16, bf16 or fp32 activations")
    if not (2 <= a_bits <= 8) or (pack and a_bits > 4):
        raise QVLMError(f"act_quant: a_bits={a_bits} with pack={pack}", "use a_bits in 2..8 (2..4 when packing)")
    if pack and x.shape[-1] % 2:
        raise QVLMError(f"int4 packing needs an even number of channels, got {x.shape[-1]}", "pad K")


def act_quant(x: torch.Tensor, a_bits: int = 8, pack: bool = False,
              BLOCK_M: int | None = None, BLOCK_K: int | None = None):
    """Triton per-token symmetric quantization: (codes, scale). Codes are int8 (..., K), or with `pack`
    int4 two per byte as uint8 (..., K/2); scale is fp32 (..., 1). Equal to qvlm.core.quant.quantize_act."""
    _check(x, a_bits, pack)
    check_launch(x)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                                # (M, K); a view when x is contiguous
    M = x2.shape[0]
    q = torch.empty((M, K // 2 if pack else K), dtype=torch.uint8 if pack else torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    # GPU: one token per program and (up to 16K channels) the whole row in one step, so pass 2 re-reads it from
    # L1/L2 and even M = 1 (decode) is a single short program; 16 warps keep that tile at <= 32 values per thread.
    # Interpreter: 16 tokens per program, since its cost is per program and per op, not per element.
    BLOCK_M = BLOCK_M or (16 if INTERPRET else 1)
    BLOCK_K = BLOCK_K or max(2, min(triton.next_power_of_2(K), 4096 if INTERPRET else 16384))
    num_warps = max(4, min(16, BLOCK_M * BLOCK_K // 1024))
    grid = (triton.cdiv(M, BLOCK_M),)
    _act_quant_kernel[grid](x2, q, scale, M, K, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
                            QMAX=2 ** (a_bits - 1) - 1, EPS=EPS, PACK=pack, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                            num_warps=num_warps)
    return q.reshape(*lead, q.shape[-1]), scale.reshape(*lead, 1)


def act_quant_ref(x: torch.Tensor, a_bits: int = 8, pack: bool = False):
    """Plain torch per-token symmetric quantization, same outputs as act_quant."""
    _check(x, a_bits, pack)
    qmax = 2 ** (a_bits - 1) - 1
    xf = x.float()                                                       # (..., K)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(EPS)  # (..., 1)
    q = torch.round(xf / scale).clamp(-qmax - 1, qmax).to(torch.int8)    # (..., K)
    if pack:
        K = x.shape[-1]
        q = pack_int4(q.reshape(-1, K), signed=True).reshape(*x.shape[:-1], K // 2)
    return q, scale
