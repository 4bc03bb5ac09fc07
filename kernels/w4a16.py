"""W4A16 GEMM: float activations x packed int4 weights, dequantized per group inside the K loop.

    out (M, N) = x (M, K) @ W_hat.T,   W_hat[n, k] = (q[n, k] - zero_point[n, g(k)]) * scale[n, g(k)]

This is the weight-only deployment of a Q-VLM (NeurIPS 2024) quantized linear layer: the int4 codes from
`qvlm.core.quant.quantize_weight` stay packed in memory (`kernels.pack`, two per byte along K) and are expanded in
registers, so the GEMM reads 4x fewer weight bytes than fp16. That is what makes decode (M = 1..16, memory-bound)
faster; prefill (M in the hundreds) is compute-bound and pays for the dequantization instead.

Data types: x fp16 / bf16 (GPU) or fp32 (exact-ish CPU interpreter checks); output has x's dtype; scale and
zero_point fp32 (N, n_groups); per-channel (n_groups = 1) or any group size dividing K that is even (a byte never
straddles two groups); symmetric (signed nibbles, no zero point) or asymmetric (unsigned nibbles + zero point).

Kernel layout: program (pid_m, pid_n) owns a (BLOCK_M, BLOCK_N) output tile. Per K step it loads BLOCK_K/2 bytes
of BLOCK_N weight rows, splits each byte into its even-k (low nibble) and odd-k (high nibble) code, dequantizes
both in fp32, and multiplies them with the even / odd columns of x: two tl.dot calls, no interleaving needed.
When a K step lies inside one group (`EVEN_GROUPS`) the scale is one vector per step; otherwise it is gathered per
byte (any even group size works, e.g. 40).

    w4a16_matmul(x, qweight, scale, zero_point, symmetric)   Triton
    w4a16_ref(x, qweight, scale, zero_point, symmetric)      plain torch: unpack, dequantize, matmul in fp32

References: Triton tutorial 03-matrix-multiplication; gpt-fast `int4 weight-only` (`_weight_int4pack_mm`);
GPTQ-triton / AutoGPTQ `quant_linear` kernels (dequantize inside the K loop).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError

from ._common import (check_2d, check_launch, interpreter_block, m_bucket, tile_offsets, unpack_nibbles,
                      upcast_bf16)
from .pack import unpack_int4_ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _configs():
    """H100 autotuning space: small BLOCK_M with long K steps for decode, 128-wide tiles for prefill.
    BLOCK_K >= 32 because each of the two dots has K = BLOCK_K / 2 and fp16 MMA needs K >= 16."""
    c = triton.Config
    return [
        c({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=3),
        c({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ]


def _even_groups(args) -> bool:
    """A K step never crosses a group boundary: per-channel, or the group size is a multiple of BLOCK_K."""
    return args["group_size"] == args["K"] or args["group_size"] % args["BLOCK_K"] == 0


@triton.heuristics({"EVEN_GROUPS": _even_groups})
@triton.jit
def _w4a16_kernel(
    x_ptr,                      # *fp16/bf16/fp32, activations (M, K)
    qw_ptr,                     # *uint8, packed int4 weight codes (N, K/2): byte j = code 2j | code 2j+1 << 4
    scale_ptr,                  # *fp32, weight scale (N, n_groups)
    zero_ptr,                   # *fp32, weight zero point (N, n_groups); read only when HAS_ZERO
    out_ptr,                    # *same dtype as x, output (M, N)
    M, N, K,                    # problem size: (M, K) @ (K, N)
    group_size,                 # input channels per weight group (= K for per-channel weights)
    M_BUCKET,                   # next power of two of M: autotuning key only, unused in the kernel
    stride_xm, stride_xk,       # strides of x
    stride_qwn, stride_qwk,     # strides of the packed weight (rows, bytes)
    stride_sn, stride_sg,       # strides of scale
    stride_zn, stride_zg,       # strides of zero_point
    stride_om, stride_on,       # strides of out
    SIGNED: tl.constexpr,       # True: symmetric codes in [-8, 7]; False: asymmetric codes in [0, 15]
    HAS_ZERO: tl.constexpr,     # subtract the zero point (asymmetric weights)
    EVEN_GROUPS: tl.constexpr,  # set by the heuristic: one scale vector per K step (no per-byte gather)
    UPCAST_BF16: tl.constexpr,  # interpreter only: do the dot in fp32 (bf16 tl.dot is broken there)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 x (no tf32 rounding); ignored for fp16/bf16
    BLOCK_M: tl.constexpr,      # output rows per program
    BLOCK_N: tl.constexpr,      # output columns per program
    BLOCK_K: tl.constexpr,      # input channels per K step (even; BLOCK_K / 2 bytes)
    GROUP_M: tl.constexpr,      # row-tiles per L2 group in the tile ordering
):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)   # (BLOCK_M,), (BLOCK_N,)
    x_rows = x_ptr + offs_m[:, None] * stride_xm                         # (BLOCK_M, 1)
    qw_cols = qw_ptr + offs_n[None, :] * stride_qwn                      # (1, BLOCK_N): weight rows as columns
    compute_dtype = tl.float32 if UPCAST_BF16 else x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)                    # (BLOCK_K/2,) bytes: codes 2j and 2j+1
        mask_j = 2 * offs_j < K
        # activations: even and odd input channels, (BLOCK_M, BLOCK_K/2) each; masked entries are 0
        mask_x = mask_m[:, None] & mask_j[None, :]
        x_lo = tl.load(x_rows + (2 * offs_j[None, :]) * stride_xk, mask=mask_x, other=0.0)
        x_hi = tl.load(x_rows + (2 * offs_j[None, :] + 1) * stride_xk, mask=mask_x, other=0.0)
        # weights: (BLOCK_K/2, BLOCK_N) bytes -> two code tiles, one per nibble
        mask_w = mask_j[:, None] & mask_n[None, :]
        p = tl.load(qw_cols + offs_j[:, None] * stride_qwk, mask=mask_w, other=0)
        lo, hi = unpack_nibbles(p, SIGNED)                               # int32 (BLOCK_K/2, BLOCK_N)
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
        # per-group scale / zero point: both nibbles of a byte share a group (group_size is even)
        if EVEN_GROUPS:
            g = k0 // group_size                                         # scalar group index of this step
            s = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)[None, :]
            if HAS_ZERO:
                z = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0)[None, :]
        else:
            g = (2 * offs_j) // group_size                               # (BLOCK_K/2,) group of each byte
            s = tl.load(scale_ptr + offs_n[None, :] * stride_sn + g[:, None] * stride_sg, mask=mask_w, other=0.0)
            if HAS_ZERO:
                z = tl.load(zero_ptr + offs_n[None, :] * stride_zn + g[:, None] * stride_zg, mask=mask_w, other=0.0)
        if HAS_ZERO:
            lo = lo - z
            hi = hi - z
        w_lo = (lo * s).to(compute_dtype)                                # dequantized, (BLOCK_K/2, BLOCK_N)
        w_hi = (hi * s).to(compute_dtype)
        acc = tl.dot(x_lo.to(compute_dtype), w_lo, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_hi.to(compute_dtype), w_hi, acc, input_precision=DOT_PRECISION)

    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out,
             mask=mask_m[:, None] & mask_n[None, :])


_w4a16_tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "group_size"])(_w4a16_kernel)

DEFAULT_BLOCK = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}   # fills in a partial `block`


def _check(x, qweight, scale, zero_point, symmetric):
    """Shapes / dtypes; returns (M, N, K, group_size)."""
    if x.dtype not in FLOAT_DTYPES:
        raise QVLMError(f"w4a16: unsupported activation dtype {x.dtype}", "use fp16, bf16 or fp32")
    K = x.shape[-1]
    check_2d("qweight", qweight, (None, K // 2), (torch.uint8,))
    N = qweight.shape[0]
    check_2d("scale", scale, (N, None), (torch.float32,))
    if K % 2 or K % scale.shape[1]:
        raise QVLMError(f"w4a16: K={K} must be even and divisible by n_groups={scale.shape[1]}", "check packing")
    group_size = K // scale.shape[1]
    if group_size % 2:
        raise QVLMError(f"w4a16: odd group size {group_size}", "use an even group size")
    if not symmetric:
        if zero_point is None:
            raise QVLMError("w4a16: asymmetric weights need a zero_point", "pass PackedWeight.zero_point")
        check_2d("zero_point", zero_point, tuple(scale.shape), (torch.float32,))
    return x.numel() // K, N, K, group_size


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                 symmetric: bool = True, block: dict | None = None) -> torch.Tensor:
    """Triton W4A16: x (..., K) @ dequant(qweight (N, K/2) uint8, scale/zero_point (N, G)).T -> (..., N) in x.dtype.
    `block` fixes the tile sizes (BLOCK_M/N/K, GROUP_M); by default CUDA autotunes and the interpreter uses
    _common.interpreter_block."""
    M, N, K, group_size = _check(x, qweight, scale, zero_point, symmetric)
    check_launch(x, qweight, scale)
    x2 = x.reshape(M, K)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    zp = scale if symmetric else zero_point                              # never read when symmetric
    args = (x2, qweight, scale, zp, out, M, N, K, group_size, m_bucket(M),
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1),
            zp.stride(0), zp.stride(1), out.stride(0), out.stride(1))
    flags = dict(SIGNED=symmetric, HAS_ZERO=not symmetric, UPCAST_BF16=upcast_bf16(x.dtype),
                 DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if block is None and x.is_cuda:
        _w4a16_tuned[grid](*args, **flags)
    else:
        b = block if block is not None else interpreter_block(M, N, K, group_size)   # interpreter: big tiles
        _w4a16_kernel[grid](*args, **flags, **{**DEFAULT_BLOCK, **b})
    return out.reshape(*x.shape[:-1], N)


def w4a16_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
              symmetric: bool = True) -> torch.Tensor:
    """Plain torch W4A16: unpack, dequantize in fp32, matmul in fp32, cast to x.dtype."""
    M, N, K, group_size = _check(x, qweight, scale, zero_point, symmetric)
    q = unpack_int4_ref(qweight, signed=symmetric).float().reshape(N, -1, group_size)     # (N, G, gs)
    z = 0.0 if symmetric else zero_point[..., None]
    w = ((q - z) * scale[..., None]).reshape(N, K)                                         # (N, K) fp32
    return (x.float() @ w.T).to(x.dtype)


if __name__ == "__main__":
    from bench.kernels import main
    main(["--kernels", "w4a16"])
