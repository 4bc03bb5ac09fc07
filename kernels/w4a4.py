"""W4A4 GEMM: packed int4 activation codes x packed int4 weight codes, unpacked in registers, int8 MMA -> int32.

Q-VLM's headline setting (NeurIPS 2024, Tables 1-3: W4A4 LLaVA) quantizes both operands to 4 bits. Here both are
stored two codes per byte along K (`kernels.act_quant(..., pack=True)`, `kernels.pack.pack_weight`), so the GEMM
reads half the bytes of W8A8. Per K step each byte tile is split into its low nibbles (even k) and high nibbles
(odd k), sign- or zero-extended to int8, and multiplied with two int8 tl.dot calls:

    acc_g += dot(a_even, w_even) + dot(a_odd, w_odd)          int8 x int8 -> int32, exact
    out[m, n] = s_a[m] * sum_g s_w[n, g] * (acc_g[m, n] - z_w[n, g] * sum_{k in g} a[m, k])

Hardware note: Hopper (H100 / H200, sm_90) has no INT4 tensor-core MMA (its wgmma takes s8/u8 as the narrowest
integer inputs; the s4 mma.m16n8k64 of Ampere / Ada has no Hopper tensor-core path), and Triton's tl.dot has no int4
operand type anyway, so on these GPUs W4A4 runs as int8 MMA after unpacking. It saves memory and
bandwidth (half the activation and weight bytes of W8A8), not MMA throughput: expect it to beat W8A8 only where
the GEMM is memory-bound (decode, small M), and to be slightly slower when compute-bound (prefill) because of the
unpacking work.

Supports: symmetric activation codes (a_bits <= 4); weights symmetric (signed nibbles) or asymmetric (unsigned
nibbles + zero point); per-channel or per-group weights (group_size a multiple of BLOCK_K; 64 on GPU, since each of
the two dots has K = BLOCK_K / 2 and NVIDIA int8 MMA needs K >= 32); fp16 / bf16 / fp32 output.

    w4a4_matmul(a_p, a_scale, w_p, w_scale, w_zero, symmetric, out_dtype)   Triton, rescaled output (M, N)
    w4a4_int32(a_p, w_p, symmetric)                                         Triton, raw accumulator (M, N) int32
    w4a4_ref(...), w4a4_int32_ref(...)                                      plain torch

References: Triton tutorial 03-matrix-multiplication; QuaRot / Atom W4A4 kernels (int4 packing along K);
NVIDIA PTX ISA, "Warpgroup MMA" (wgmma .s8/.u8 only) and "mma.m16n8k64 .s4" (sm_80-sm_89).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError

from ._common import (check_2d, check_launch, interpreter_block, m_bucket, rescale_group, store_int_gemm,
                      tile_offsets, unpack_nibbles)
from .pack import unpack_int4_ref
from .w8a8 import OUT_DTYPES

MIN_BLOCK_K = 64          # two int8 dots of K = BLOCK_K / 2 >= 32 each


def _configs():
    """H100 autotuning space (BLOCK_K counts unpacked channels, >= 64): decode and prefill tiles."""
    c = triton.Config
    return [
        c({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=3),
        c({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose K step stays inside one weight group (per-channel: all)."""
    G, K = named_args["group_size"], named_args["K"]
    return [c for c in configs if G == K or G % c.kwargs["BLOCK_K"] == 0]


@triton.jit
def _w4a4_kernel(
    a_ptr,                      # *uint8, packed int4 activation codes (M, K/2), signed nibbles
    w_ptr,                      # *uint8, packed int4 weight codes (N, K/2)
    a_scale_ptr,                # *fp32, per-token activation scale (M,)
    w_scale_ptr,                # *fp32, weight scale (N, n_groups)
    w_zero_ptr,                 # *fp32, weight zero point (N, n_groups), integer-valued; read only when HAS_ZERO
    out_ptr,                    # *fp16/bf16/fp32 output (M, N), or *int32 raw accumulator when RAW
    M, N, K,                    # problem size in unpacked channels: (M, K) @ (K, N)
    group_size,                 # input channels per weight group (= K for per-channel weights)
    n_groups,                   # K // group_size
    M_BUCKET,                   # next power of two of M: autotuning key only, unused in the kernel
    stride_am, stride_ak,       # strides of a (rows, bytes)
    stride_wn, stride_wk,       # strides of w (rows, bytes)
    stride_sn, stride_sg,       # strides of w_scale
    stride_zn, stride_zg,       # strides of w_zero
    stride_om, stride_on,       # strides of out
    W_SIGNED: tl.constexpr,     # True: weight nibbles are signed [-8, 7]; False: unsigned [0, 15]
    HAS_ZERO: tl.constexpr,     # subtract z_w * (sum of activation codes in the group)
    RAW: tl.constexpr,          # write the raw int32 sum a @ w.T (no zero point, no scales)
    BLOCK_M: tl.constexpr,      # output rows per program
    BLOCK_N: tl.constexpr,      # output columns per program
    BLOCK_K: tl.constexpr,      # unpacked channels per K step (BLOCK_K / 2 bytes); divides group_size
    GROUP_M: tl.constexpr,      # row-tiles per L2 group in the tile ordering
):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)   # (BLOCK_M,), (BLOCK_N,)
    a_rows = a_ptr + offs_m[:, None] * stride_am                         # (BLOCK_M, 1)
    w_cols = w_ptr + offs_n[None, :] * stride_wn                         # (1, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)                 # rescaled sum over groups
    acc_raw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)               # RAW: integer sum over all of K
    for g in range(0, n_groups):
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)             # exact integer sum inside group g
        a_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)                     # sum of activation codes in group g
        for k0 in range(g * group_size, (g + 1) * group_size, BLOCK_K):
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)                # (BLOCK_K/2,) bytes: codes 2j, 2j+1
            mask_j = 2 * offs_j < K                                      # only bites when per-channel
            a_p = tl.load(a_rows + offs_j[None, :] * stride_ak, mask=mask_m[:, None] & mask_j[None, :], other=0)
            w_p = tl.load(w_cols + offs_j[:, None] * stride_wk, mask=mask_j[:, None] & mask_n[None, :], other=0)
            a_lo, a_hi = unpack_nibbles(a_p, True)                       # (BLOCK_M, BLOCK_K/2) int32, [-8, 7]
            w_lo, w_hi = unpack_nibbles(w_p, W_SIGNED)                   # (BLOCK_K/2, BLOCK_N) int32
            acc_g = tl.dot(a_lo.to(tl.int8), w_lo.to(tl.int8), acc_g, out_dtype=tl.int32)   # even channels
            acc_g = tl.dot(a_hi.to(tl.int8), w_hi.to(tl.int8), acc_g, out_dtype=tl.int32)   # odd channels
            if HAS_ZERO:
                a_sum += tl.sum(a_lo + a_hi, axis=1)
        if RAW:
            acc_raw += acc_g
        else:
            acc = rescale_group(acc, acc_g, a_sum, w_scale_ptr, w_zero_ptr, g, offs_n, mask_n,
                                stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZERO)

    store_int_gemm(out_ptr, acc, acc_raw, a_scale_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, RAW)


_w4a4_tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "group_size"],
                              prune_configs_by={"early_config_prune": _prune})(_w4a4_kernel)

DEFAULT_BLOCK = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}   # fills in a partial `block`


def _block_for(block: dict | None, group_size: int, K: int) -> dict:
    """Untuned tile sizes: DEFAULT_BLOCK overridden by `block`, BLOCK_K shrunk to divide the group size."""
    b = {**DEFAULT_BLOCK, **(block or {})}
    if group_size != K:
        while b["BLOCK_K"] > 2 and group_size % b["BLOCK_K"]:
            b["BLOCK_K"] //= 2
        if group_size % b["BLOCK_K"] or (block and "BLOCK_K" in block and b["BLOCK_K"] != block["BLOCK_K"]):
            raise QVLMError(f"BLOCK_K={b['BLOCK_K']} does not divide group_size={group_size}", "pick a divisor")
    return b


def _check(a_p, a_scale, w_p, w_scale, w_zero):
    """Shapes / dtypes; returns (M, N, K) with K in unpacked channels."""
    check_2d("a_p", a_p, (None, None), (torch.uint8,))
    M, KH = a_p.shape
    check_2d("w_p", w_p, (None, KH), (torch.uint8,))
    N, K = w_p.shape[0], 2 * KH
    if a_scale is not None:
        check_2d("a_scale", a_scale.reshape(-1, 1), (M, 1), (torch.float32,))
    if w_scale is not None:
        check_2d("w_scale", w_scale, (N, None), (torch.float32,))
        if K % w_scale.shape[1] or (K // w_scale.shape[1]) % 2:
            raise QVLMError(f"w4a4: n_groups={w_scale.shape[1]} must split K={K} into even groups", "check scales")
    if w_zero is not None:
        check_2d("w_zero", w_zero, tuple(w_scale.shape), (torch.float32,))
    return M, N, K


def _launch(a_p, a_scale, w_p, w_scale, w_zero, symmetric, out, raw, block):
    M, KH = a_p.shape
    N, K = w_p.shape[0], 2 * KH
    n_groups = 1 if w_scale is None else w_scale.shape[1]
    group_size = K // n_groups                                          # = K for per-channel weights
    s = w_scale if w_scale is not None else out                         # placeholders are never read when RAW
    z = w_zero if w_zero is not None else s
    a_s = a_scale.reshape(-1) if a_scale is not None else out
    args = (a_p, w_p, a_s, s, z, out, M, N, K, group_size, n_groups, m_bucket(M),
            a_p.stride(0), a_p.stride(1), w_p.stride(0), w_p.stride(1), s.stride(0), s.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1))
    flags = dict(W_SIGNED=symmetric, HAS_ZERO=(not symmetric) and not raw, RAW=raw)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if block is None and a_p.is_cuda:
        if group_size != K and group_size % MIN_BLOCK_K:
            raise QVLMError(f"w4a4 on GPU needs group_size % {MIN_BLOCK_K} == 0, got {group_size}",
                            "use per-channel weights or a group size like 64 / 128")
        _w4a4_tuned[grid](*args, **flags)
    else:
        b = block if block is not None else interpreter_block(M, N, K, group_size)   # interpreter: big tiles
        _w4a4_kernel[grid](*args, **flags, **_block_for(b, group_size, K))
    return out


def w4a4_matmul(a_p: torch.Tensor, a_scale: torch.Tensor, w_p: torch.Tensor, w_scale: torch.Tensor,
                w_zero: torch.Tensor | None = None, symmetric: bool = True, out_dtype: torch.dtype = torch.float16,
                block: dict | None = None) -> torch.Tensor:
    """Triton W4A4: packed a_p (M, K/2) with a_scale (M, 1) x packed w_p (N, K/2) with w_scale/w_zero (N, G) -> (M, N).
    `symmetric` describes the weights (signed nibbles, no zero point). CUDA autotunes unless `block` is given."""
    M, N, K = _check(a_p, a_scale, w_p, w_scale, w_zero)
    if out_dtype not in OUT_DTYPES:
        raise QVLMError(f"w4a4: unsupported out_dtype {out_dtype}", "use fp16, bf16 or fp32")
    if not symmetric and w_zero is None:
        raise QVLMError("w4a4: asymmetric weights need w_zero", "pass PackedWeight.zero_point")
    check_launch(a_p, w_p)
    out = torch.empty((M, N), dtype=out_dtype, device=a_p.device)
    return _launch(a_p, a_scale, w_p, w_scale, w_zero, symmetric, out, raw=False, block=block)


def w4a4_int32(a_p: torch.Tensor, w_p: torch.Tensor, symmetric: bool = True, block: dict | None = None) -> torch.Tensor:
    """Triton raw accumulator: unpack(a_p) (M, K) @ unpack(w_p).T -> (M, N) int32, exact (for tests)."""
    M, N, K = _check(a_p, None, w_p, None, None)
    check_launch(a_p, w_p)
    out = torch.empty((M, N), dtype=torch.int32, device=a_p.device)
    return _launch(a_p, None, w_p, None, None, symmetric, out, raw=True, block=block)


def w4a4_int32_ref(a_p: torch.Tensor, w_p: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """Plain torch raw accumulator: unpack both, exact float64 matmul, int32."""
    a = unpack_int4_ref(a_p, signed=True).double()
    w = unpack_int4_ref(w_p, signed=symmetric).double()
    return (a @ w.T).round().to(torch.int32)


def w4a4_ref(a_p: torch.Tensor, a_scale: torch.Tensor, w_p: torch.Tensor, w_scale: torch.Tensor,
             w_zero: torch.Tensor | None = None, symmetric: bool = True,
             out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Plain torch W4A4: unpack, per-group exact integer sums (float64), zero-point correction, rescale, cast."""
    M, N, K = _check(a_p, a_scale, w_p, w_scale, w_zero)
    G = w_scale.shape[1]
    a = unpack_int4_ref(a_p, signed=True).double().reshape(M, G, K // G)          # (M, G, gs)
    w = unpack_int4_ref(w_p, signed=symmetric).double().reshape(N, G, K // G)     # (N, G, gs)
    acc = torch.einsum("mgk,ngk->mng", a, w)                                      # (M, N, G) exact integers
    if not symmetric:
        acc = acc - a.sum(-1)[:, None, :] * w_zero.double()[None]
    out = (acc * w_scale.double()[None]).sum(-1) * a_scale.reshape(M, 1).double()
    return out.to(out_dtype)


if __name__ == "__main__":
    from bench.kernels import main
    main(["--kernels", "w4a4"])
