"""W8A8 GEMM: int8 activation codes x int8 weight codes -> int32 accumulator -> fused per-token x per-channel rescale.

With per-token activation codes a (scale s_a, from `kernels.act_quant` / `qvlm.core.quant.quantize_act`) and weight codes
w (scale s_w, zero point z_w per output channel or per group of input channels, from `qvlm.core.quant.quantize_weight`):

    out[m, n] = s_a[m] * sum_g s_w[n, g] * ( sum_{k in g} a[m, k] * w[n, k]  -  z_w[n, g] * sum_{k in g} a[m, k] )
                         \______________ int32, exact: one tl.dot(int8, int8 -> int32) per K step ______________/

which equals fake_quant_act(x) @ fake_quant_weight(W).T (the Q-VLM simulated-quantization reference) up to fp32
rounding in the rescale. Integer partial sums never leave int32 inside a group, so for group_size = 0 (one group per
channel) the whole dot product is exact; with groups each group's int32 sum is rescaled and added in fp32.

Supports: activation codes symmetric int8 (any a_bits <= 8); weight codes int8 (symmetric, zero_point 0) or
asymmetric with a zero point (codes must fit int8: `kernels.pack.pack_weight` stores 8-bit asymmetric codes shifted by
-128 together with zero_point - 128); per-channel or per-group (group_size a multiple of BLOCK_K; 32 on GPU, since
NVIDIA int8 MMA needs K >= 32); fp16 / bf16 / fp32 output.

    w8a8_matmul(a_q, a_scale, w_q, w_scale, w_zero, out_dtype)   Triton, rescaled output (M, N)
    w8a8_int32(a_q, w_q)                                           Triton, raw accumulator a_q @ w_q.T (M, N) int32
    w8a8_ref(...), w8a8_int32_ref(...)                             plain torch (exact integer sums in float64)

References: Triton tutorial 03-matrix-multiplication (int8 dot with out_dtype=int32); SmoothQuant / torch-int
W8A8 GEMMs with per-token x per-channel epilogue; gpt-fast `int8 weight-only`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError

from ._common import (check_2d, check_launch, interpreter_block, m_bucket, rescale_group, store_int_gemm,
                      tile_offsets)

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_BLOCK_K = 32          # NVIDIA int8 MMA: K >= 32 per tl.dot


def _configs():
    """H100 autotuning space for int8 MMA (BLOCK_K >= 32): decode tiles (BLOCK_M 16) and prefill tiles (128 x 128+)."""
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
        c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),   # group 32
    ]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose K step stays inside one weight group (per-channel: all)."""
    G, K = named_args["group_size"], named_args["K"]
    return [c for c in configs if G == K or G % c.kwargs["BLOCK_K"] == 0]


@triton.jit
def _w8a8_kernel(
    a_ptr,                      # *int8, activation codes (M, K)
    w_ptr,                      # *int8, weight codes (N, K)
    a_scale_ptr,                # *fp32, per-token activation scale (M,)
    w_scale_ptr,                # *fp32, weight scale (N, n_groups)
    w_zero_ptr,                 # *fp32, weight zero point (N, n_groups), integer-valued; read only when HAS_ZERO
    out_ptr,                    # *fp16/bf16/fp32 output (M, N), or *int32 raw accumulator when RAW
    M, N, K,                    # problem size: (M, K) @ (K, N)
    group_size,                 # input channels per weight group (= K for per-channel weights)
    n_groups,                   # K // group_size
    M_BUCKET,                   # next power of two of M: autotuning key only, unused in the kernel
    stride_am, stride_ak,       # strides of a
    stride_wn, stride_wk,       # strides of w
    stride_sn, stride_sg,       # strides of w_scale
    stride_zn, stride_zg,       # strides of w_zero
    stride_om, stride_on,       # strides of out
    HAS_ZERO: tl.constexpr,     # subtract z_w * (sum of activation codes in the group)
    RAW: tl.constexpr,          # write the raw int32 sum a @ w.T (no zero point, no scales)
    BLOCK_M: tl.constexpr,      # output rows per program
    BLOCK_N: tl.constexpr,      # output columns per program
    BLOCK_K: tl.constexpr,      # input channels per K step; divides group_size unless per-channel
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
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K                                          # only bites when per-channel
            a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0)
            w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0)
            acc_g = tl.dot(a, w, acc_g, out_dtype=tl.int32)              # int8 x int8 -> int32 MMA
            if HAS_ZERO:
                a_sum += tl.sum(a.to(tl.int32), axis=1)
        if RAW:
            acc_raw += acc_g
        else:
            acc = rescale_group(acc, acc_g, a_sum, w_scale_ptr, w_zero_ptr, g, offs_n, mask_n,
                                stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZERO)

    store_int_gemm(out_ptr, acc, acc_raw, a_scale_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, RAW)


_w8a8_tuned = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "group_size"],
                              prune_configs_by={"early_config_prune": _prune})(_w8a8_kernel)

DEFAULT_BLOCK = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}   # fills in a partial `block`


def _block_for(block: dict | None, group_size: int, K: int) -> dict:
    """Untuned tile sizes: DEFAULT_BLOCK overridden by `block`, BLOCK_K shrunk to divide the group size."""
    b = {**DEFAULT_BLOCK, **(block or {})}
    if group_size != K:
        while group_size % b["BLOCK_K"]:
            b["BLOCK_K"] //= 2
        if block and "BLOCK_K" in block and b["BLOCK_K"] != block["BLOCK_K"]:
            raise QVLMError(f"BLOCK_K={block['BLOCK_K']} does not divide group_size={group_size}", "pick a divisor")
    return b


def _launch(a_q, a_scale, w_q, w_scale, w_zero, out, raw, block):
    M, K = a_q.shape
    N = w_q.shape[0]
    n_groups = 1 if w_scale is None else w_scale.shape[1]
    group_size = K // n_groups                                          # = K for per-channel weights
    s = w_scale if w_scale is not None else out                         # placeholders are never read when RAW
    z = w_zero if w_zero is not None else s
    a_s = a_scale.reshape(-1) if a_scale is not None else out
    args = (a_q, w_q, a_s, s, z, out, M, N, K, group_size, n_groups, m_bucket(M),
            a_q.stride(0), a_q.stride(1), w_q.stride(0), w_q.stride(1), s.stride(0), s.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1))
    flags = dict(HAS_ZERO=w_zero is not None and not raw, RAW=raw)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if block is None and a_q.is_cuda:
        if group_size != K and group_size % MIN_BLOCK_K:
            raise QVLMError(f"w8a8 on GPU needs group_size % {MIN_BLOCK_K} == 0, got {group_size}",
                            "use per-channel weights or a group size like 64 / 128")
        _w8a8_tuned[grid](*args, **flags)
    else:
        b = block if block is not None else interpreter_block(M, N, K, group_size)   # interpreter: big tiles
        _w8a8_kernel[grid](*args, **flags, **_block_for(b, group_size, K))
    return out


def _check(a_q, a_scale, w_q, w_scale, w_zero):
    check_2d("a_q", a_q, (None, None), (torch.int8,))
    M, K = a_q.shape
    check_2d("w_q", w_q, (None, K), (torch.int8,))
    N = w_q.shape[0]
    if a_scale is not None:
        check_2d("a_scale", a_scale.reshape(-1, 1), (M, 1), (torch.float32,))
    if w_scale is not None:
        check_2d("w_scale", w_scale, (N, None), (torch.float32,))
        if K % w_scale.shape[1]:
            raise QVLMError(f"w8a8: n_groups={w_scale.shape[1]} does not divide K={K}", "check the weight scales")
    if w_zero is not None:
        check_2d("w_zero", w_zero, tuple(w_scale.shape), (torch.float32,))
    return M, N, K


def w8a8_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                w_zero: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                block: dict | None = None) -> torch.Tensor:
    """Triton W8A8: int8 a_q (M, K) with a_scale (M, 1) x int8 w_q (N, K) with w_scale/w_zero (N, G) -> (M, N).
    w_zero None = symmetric weights. CUDA autotunes unless `block` is given."""
    M, N, K = _check(a_q, a_scale, w_q, w_scale, w_zero)
    if out_dtype not in OUT_DTYPES:
        raise QVLMError(f"w8a8: unsupported out_dtype {out_dtype}", "use fp16, bf16 or fp32")
    check_launch(a_q, w_q)
    out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    return _launch(a_q, a_scale, w_q, w_scale, w_zero, out, raw=False, block=block)


def w8a8_int32(a_q: torch.Tensor, w_q: torch.Tensor, block: dict | None = None) -> torch.Tensor:
    """Triton raw accumulator: a_q (M, K) int8 @ w_q (N, K).T int8 -> (M, N) int32, exact (for tests)."""
    M, N, K = _check(a_q, None, w_q, None, None)
    check_launch(a_q, w_q)
    out = torch.empty((M, N), dtype=torch.int32, device=a_q.device)
    return _launch(a_q, None, w_q, None, None, out, raw=True, block=block)


def w8a8_int32_ref(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Plain torch raw accumulator: exact in float64 (|sum| < 2^53), returned as int32."""
    return (a_q.double() @ w_q.double().T).round().to(torch.int32)


def w8a8_ref(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             w_zero: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Plain torch W8A8: per-group exact integer sums (float64), zero-point correction, rescale, cast."""
    M, N, K = _check(a_q, a_scale, w_q, w_scale, w_zero)
    G = w_scale.shape[1]
    a = a_q.double().reshape(M, G, K // G)                               # (M, G, gs)
    w = w_q.double().reshape(N, G, K // G)                               # (N, G, gs)
    acc = torch.einsum("mgk,ngk->mng", a, w)                             # (M, N, G) exact integers
    if w_zero is not None:
        acc = acc - a.sum(-1)[:, None, :] * w_zero.double()[None]        # subtract z_w * sum_k a
    out = (acc * w_scale.double()[None]).sum(-1) * a_scale.reshape(M, 1).double()
    return out.to(out_dtype)


if __name__ == "__main__":
    from bench.kernels import main
    main(["--kernels", "w8a8"])
