"""Helpers shared by the kernel files: launch checks, the int4 nibble layout, rounding, tile ordering.

Packed int4 layout (used by `pack.py`, `act_quant.py`, `w4a16.py`, `w4a4.py`): a tensor of codes (R, K) is stored
as uint8 (R, K // 2); byte j of a row holds code 2j in its low nibble and code 2j + 1 in its high nibble.
Symmetric codes (in [-8, 7]) are stored as 4-bit two's complement (`q & 0xF`) and sign-extended on unpacking;
asymmetric codes (in [0, 15]) are stored as is and zero-extended.

Two facts about triton 3.9's CPU interpreter (TRITON_INTERPRET=1) that the kernels work around:
1) `libdevice.rint` (and every other libdevice call) raises in the interpreter, so round-half-to-even, which
   `torch.round` uses, is written out in `round_half_even` with floor/compare; it is exact for |y| < 2^23.
2) `tl.dot` on bfloat16 operands returns garbage in the interpreter (it multiplies the uint16 storage); the fp
   kernels take an `UPCAST_BF16` flag that casts bf16 tiles to fp32 before `tl.dot` in the interpreter only.
   A bf16 x bf16 product is exact in fp32, so this matches a bf16 MMA with fp32 accumulation.

References: Triton tutorial 03-matrix-multiplication (grouped tile ordering, autotune configs); gpt-fast
`quantize.py` (int4 packing along the input dimension).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError

# Read once at import, like `triton.jit` itself (it decides at decoration time whether to interpret).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_launch(*tensors: torch.Tensor) -> bool:
    """True when Triton kernels can run on these tensors: all on CUDA, or the CPU interpreter is on."""
    return INTERPRET or all(t.is_cuda for t in tensors)


def check_launch(*tensors: torch.Tensor) -> None:
    """Raise a one-line error when a Triton kernel cannot run on these tensors."""
    if not can_launch(*tensors):
        raise QVLMError("Triton kernels need CUDA tensors or TRITON_INTERPRET=1 (set before importing kernels)",
                        "move the tensors to a GPU, export TRITON_INTERPRET=1, or call the *_ref function")


def check_2d(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple) -> None:
    """Assert t is 2-D with the given shape (None = any) and one of the given dtypes."""
    if t.dim() != 2 or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise QVLMError(f"{name} has shape {tuple(t.shape)}, expected {shape}", "check the operand layout")
    if t.dtype not in dtypes:
        raise QVLMError(f"{name} has dtype {t.dtype}, expected one of {dtypes}", "convert it first")


def m_bucket(M: int) -> int:
    """Autotuning key for the token count: the next power of two, so prefill lengths share tuned configs."""
    return triton.next_power_of_2(max(M, 1))


def interpreter_rows(M: int, row: int) -> int:
    """Rows per program for the row-wise kernels (act_quant, hadamard) in the CPU interpreter: as many as fit a tile
    of 2^18 values (triton caps a tile at 2^20), at most the next power of two of M."""
    return max(1, min(triton.next_power_of_2(max(M, 1)), 2 ** 18 // row))


def interpreter_block(M: int, N: int, K: int, group_size: int) -> dict:
    """Untuned tiles for the CPU interpreter, whose cost is per program and per op far more than per element: one
    program covers up to 1024 x 512 outputs and up to 512 channels per K step (next powers of two; the kernels mask
    the ragged edges). Grouped weights step by the largest power of two dividing the group (<= 512). The integer
    GEMMs' results do not depend on the tiles (tests/kernels/test_default_tiles.py)."""
    np2 = triton.next_power_of_2
    step = np2(K) if group_size == K else group_size & -group_size      # per-channel: masked; grouped: divides
    return {"BLOCK_M": min(np2(M), 1024), "BLOCK_N": min(np2(N), 512), "BLOCK_K": max(2, min(step, 512)), "GROUP_M": 8}


def upcast_bf16(dtype: torch.dtype) -> bool:
    """Whether a kernel must cast bf16 tiles to fp32 before tl.dot (interpreter bug, see module docstring)."""
    return INTERPRET and dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- in-kernel helpers
@triton.jit
def round_half_even(y):
    """fp32 -> int32, rounding half to even like torch.round (exact for |y| < 2^23; here |y| <= 128)."""
    r = tl.floor(y)
    d = y - r                                    # fractional part in [0, 1): exact for |y| < 2^23
    ri = r.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((ri & 1) == 1))
    return ri + up.to(tl.int32)


@triton.jit
def unpack_nibbles(packed, SIGNED: tl.constexpr):
    """uint8 tile -> (low, high) int32 nibble tiles; SIGNED sign-extends to [-8, 7], else [0, 15]."""
    p = packed.to(tl.int32)                      # zero-extend the byte
    lo = p & 0xF                                 # code 2j
    hi = (p >> 4) & 0xF                          # code 2j + 1
    if SIGNED:
        lo = (lo ^ 8) - 8                        # 4-bit two's complement -> int
        hi = (hi ^ 8) - 8
    return lo, hi


@triton.jit
def pack_nibbles(lo, hi):
    """Two int32 code tiles (2j, 2j + 1) -> one uint8 tile; negative codes keep their low 4 bits."""
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in grouped order: GROUP_M row-tiles share each column-tile while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile: row / column offsets (BLOCK_M,), (BLOCK_N,) and their in-bounds masks."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def rescale_group(acc, acc_g, a_sum, w_scale_ptr, w_zero_ptr, g, offs_n, mask_n,
                  stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZERO: tl.constexpr):
    """Integer GEMMs: add one weight group's int32 partial sum to the fp32 accumulator, times the group's per-channel
    weight scale, after subtracting z_w * (sum of the activation codes in the group) for asymmetric weights."""
    s_w = tl.load(w_scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)        # (BLOCK_N,)
    if HAS_ZERO:
        z_w = tl.load(w_zero_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0.0)
        acc_g -= a_sum[:, None] * z_w.to(tl.int32)[None, :]                  # still exact in int32
    return acc + acc_g.to(tl.float32) * s_w[None, :]


@triton.jit
def store_int_gemm(out_ptr, acc, acc_raw, a_scale_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on,
                   RAW: tl.constexpr):
    """Integer GEMMs' epilogue: RAW stores the int32 sum, else acc times the per-token activation scale."""
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    o_mask = mask_m[:, None] & mask_n[None, :]
    if RAW:
        tl.store(o_ptrs, acc_raw, mask=o_mask)
    else:
        s_a = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)          # (BLOCK_M,) per-token scale
        tl.store(o_ptrs, (acc * s_a[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
