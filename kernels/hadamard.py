"""Online (fast) Walsh-Hadamard transform of activations: QuaRot's rotation of the `down_proj` input, as a kernel.

QuaRot (Ashkboos et al. 2024) folds a Hadamard rotation into the weight offline (W <- W H / sqrt(n)) and applies
the same rotation to the layer input online, which spreads the MLP's activation outliers over all channels before
per-token quantization. For n = m * p channels, m the order of a small non-power-of-two Hadamard matrix `base`
(Paley: 12, 20, 28, ...; or None for m = 1) and p a power of two:

    y = x @ H_n / sqrt(n),   H_n = kron(base, H_p),   H_p Sylvester: H_p[d, b] = (-1)^popcount(d & b)

so channel i = a * p + b (a over base, b over H_p). By the mixed-product property that is two small matmuls:
view x as (M, m, p), apply H_p along the last axis, then base along the middle one. `qvlm.core.hadamard.kernel_base(n)`
gives the `base` for which this equals `qvlm.core.hadamard.fwht` (the kernels package may not import it: stages).

    hadamard(x, base)                            Triton: (..., n) -> (..., n), x's dtype (fp16 / bf16 / fp32)
    hadamard_ref(x, base)                        the same in plain torch (fp32 math)
    hadamard_act_quant(x, base, a_bits, pack)    Triton: the transform fused with `act_quant`'s per-token codes
    supported(n, base)                           whether the kernel handles this size (else use the torch FWHT)

Kernel layout. Each program owns BLOCK_M whole rows, loaded as one (BLOCK_M, NM, T) tile (T <= 256 channels per
chunk, NM chunks), so the row never goes back to memory between the two stages (the transform is memory-bound):
  1) H_T along the chunk: one tl.dot of (BLOCK_M * NM, T) x (T, T). A tensor-core MMA rather than log2(T)
     butterfly stages, because Triton has no cheap lane shuffles for butterflies (each stage would be a reshape
     and a permute of the whole tile), while +-1 entries are exact in fp16 / bf16, so the MMA's products are exact
     and only its fp32 accumulation order differs from the reference. H_T is generated in registers from the
     parity formula above: no cached device tensor, no extra global reads.
  2) A = kron(base, H_P1) across the chunks: permute the tile to (BLOCK_M * T, NM) and one tl.dot with A (NM, NM),
     padded to >= 16 (tl.dot's minimum). For p <= 256, P1 = 1 and A = base; for p > 256 the power of two is split
     as H_p = H_P1 (x) H_256 and H_P1 joins the mixing matrix (so n = 4096 is 16 chunks of 256).
  The mixing matrix must fit one tile: NM = m * max(1, p / 256) <= 64 (MAX_MIX). fp32 accumulation throughout;
  fp32 operands use input_precision="ieee" (no tf32 rounding), like the house GEMMs. Ragged M: masked rows.
  In the interpreter, bf16 tiles are upcast before tl.dot (see _common) and the fp32 -> bf16 output cast, which
  the interpreter truncates, is rounded to nearest even by hand (`_to_dtype`), so outputs match torch's `.to`.

Accuracy contract: equal to hadamard_ref up to the fp32 summation order (rel. error ~1e-6 for fp32; for fp16 / bf16
outputs at most one unit in the last place where the fp32 values straddle a rounding boundary). Not bitwise.

Fused quantization: hadamard_act_quant rounds the transform to x's dtype exactly as `hadamard` stores it, then
quantizes per token like `act_quant` (div_rn, round half to even). Its codes and scales are therefore bit-identical
to act_quant_ref(hadamard(x, base)) (the unfused deployment path, same kernel code and tile sizes), and equal to
act_quant_ref(hadamard_ref(x, base)) up to one code where the transform's last bit differs (tested: <= 1 code, on
a small fraction of elements).

References: QuaRot `hadamard_utils.py` (matmul_hadU: Kronecker of a stored H_12 / H_20 / ... and a power-of-two
FWHT); Dao-AILab fast-hadamard-transform (the CUDA kernel QuaRot calls); Triton tutorial 03 (tl.dot tiles).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError

from ._common import INTERPRET, check_launch, interpreter_rows, pack_nibbles, round_half_even, upcast_bf16
from .act_quant import EPS, act_quant
from .act_quant import _check as _check_act

MAX_T = 256         # largest Sylvester block applied by one tl.dot (a 256 x 256 +-1 tile; bigger ones spill)
MAX_MIX = 64        # largest chunk-mixing matrix kron(base, H_P1) the kernel holds in one tile
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FIX = "pass qvlm.core.hadamard.kernel_base(n) as base (None when n is a power of two)"


def _split(n: int, base: torch.Tensor | None) -> tuple[int, int]:
    """(m, p) with n = m * p, m = base order and p a power of two; one-line QVLMError otherwise."""
    if base is None:
        m = 1
    elif base.dim() != 2 or base.shape[0] != base.shape[1] or base.shape[0] < 1:
        raise QVLMError(f"hadamard: base has shape {tuple(base.shape)}, expected a square (m, m) matrix", _FIX)
    else:
        m = base.shape[0]
    if n < 1 or n % m:
        raise QVLMError(f"hadamard: {n} channels are not a multiple of the base order m={m}", _FIX)
    p = n // m
    if p & (p - 1):
        raise QVLMError(f"hadamard: n/m = {n}/{m} = {p} is not a power of two", _FIX)
    return m, p


def _plan(n: int, base: torch.Tensor | None) -> dict:
    """The kernel's view of n: NM chunks of T channels, mixing matrix kron(base, H_P1), tile paddings."""
    m, p = _split(n, base)
    T = min(p, MAX_T)
    P1 = p // T                                          # > 1 only when p > 256: H_p = H_P1 (x) H_T
    NM = m * P1                                          # chunks per row
    if NM > MAX_MIX:
        raise QVLMError(f"hadamard: n={n} needs a {NM}x{NM} chunk-mixing matrix (m={m} x {P1}), above the "
                        f"kernel's {MAX_MIX}", "use qvlm.core.hadamard.fwht (torch) for this size")
    return dict(NM=NM, T=T, P1=P1, HAS_BASE=base is not None,
                M_PAD=1 if NM == 1 else max(16, triton.next_power_of_2(NM)),   # tl.dot needs dims >= 16
                T_PAD=max(16, T))


def supported(n: int, base: torch.Tensor | None) -> bool:
    """True when the kernel handles n channels with this base (n = m * 2^k and a chunk-mixing matrix <= MAX_MIX):
    callers fall back to the torch FWHT otherwise (e.g. 576 = 144 x 4)."""
    try:
        _plan(n, base)
    except QVLMError:
        return False
    return True


# ------------------------------------------------------------------------------------------- kernels
@triton.jit
def _parity(v):
    """popcount(v) & 1 for int32 v >= 0 (xor folding; libdevice.popc is unavailable in the interpreter)."""
    v = v ^ (v >> 16)
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return v & 1


@triton.jit
def _to_dtype(y, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even. RNE_BF16 (interpreter, bf16 only): its fp32 -> bf16 cast truncates,
    so round the fp32 bits to the bf16 grid first (add 0x7FFF + the kept lsb, clear the low half); then it is exact."""
    if RNE_BF16:
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _hadamard_rows(x_ptr, base_ptr, offs_m, mask_m, stride_xm, stride_xk, stride_b0, stride_b1, inv_sqrt_n,
                   NM: tl.constexpr, T: tl.constexpr, P1: tl.constexpr, HAS_BASE: tl.constexpr,
                   M_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                   UPCAST_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Rows offs_m of x, viewed (M, NM, T), times kron(A, H_T) / sqrt(n) with A = kron(base, H_P1).
    Returns y (BLOCK_M, M_PAD, T_PAD) fp32 (exactly 0 in the padding), the in-row offsets a * T + b
    (M_PAD, T_PAD) and their mask."""
    offs_a = tl.arange(0, M_PAD)                                            # chunk a (of NM)
    offs_b = tl.arange(0, T_PAD)                                            # channel b inside a chunk (of T)
    cols = offs_a[:, None] * T + offs_b[None, :]                            # (M_PAD, T_PAD) in-row offset
    mask_c = (offs_a[:, None] < NM) & (offs_b[None, :] < T)
    x = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + cols[None, :, :] * stride_xk,
                mask=mask_m[:, None, None] & mask_c[None, :, :], other=0.0)  # (BLOCK_M, M_PAD, T_PAD)
    if UPCAST_BF16:
        x = x.to(tl.float32)

    # stage 1: H_T along the chunk, H_T[d, b] = (-1)^popcount(d & b), zero outside T x T (exact in any dtype)
    hmask = (offs_b[:, None] < T) & (offs_b[None, :] < T)
    h = tl.where(hmask, 1 - 2 * _parity(offs_b[:, None] & offs_b[None, :]), 0).to(x.dtype)      # (T_PAD, T_PAD)
    y = tl.dot(tl.reshape(x, (BLOCK_M * M_PAD, T_PAD)), h, input_precision=DOT_PRECISION,
               out_dtype=tl.float32)                                         # (BLOCK_M * M_PAD, T_PAD) fp32
    y = tl.reshape(y, (BLOCK_M, M_PAD, T_PAD))

    # stage 2: A across the chunks, A[c, a] = base[c // P1, a // P1] * H_P1[c % P1, a % P1]
    if NM > 1:
        ci = offs_a[:, None]                                                 # (M_PAD, 1) input chunk
        ai = offs_a[None, :]                                                 # (1, M_PAD) output chunk
        amask = (ci < NM) & (ai < NM)
        sign = (1 - 2 * _parity((ci % P1) & (ai % P1))).to(tl.float32)
        if HAS_BASE:
            b = tl.load(base_ptr + (ci // P1) * stride_b0 + (ai // P1) * stride_b1, mask=amask, other=0.0)
            a_mix = b.to(tl.float32) * sign                                  # (M_PAD, M_PAD)
        else:
            a_mix = tl.where(amask, sign, 0.0)
        yt = tl.reshape(tl.permute(y, (0, 2, 1)), (BLOCK_M * T_PAD, M_PAD))  # chunk axis last
        z = tl.dot(yt, a_mix, input_precision="ieee", out_dtype=tl.float32)  # fp32 operands: no tf32 rounding
        y = tl.permute(tl.reshape(z, (BLOCK_M, T_PAD, M_PAD)), (0, 2, 1))    # (BLOCK_M, M_PAD, T_PAD)
    return y * inv_sqrt_n, cols, mask_c


@triton.jit
def _hadamard_kernel(
    x_ptr,                      # *fp16/bf16/fp32, activations (M, n)
    base_ptr,                   # *fp32, base (m, m) +-1 matrix (unused when not HAS_BASE)
    out_ptr,                    # *same dtype as x, rotated activations (M, n)
    M,                          # number of tokens (rows)
    stride_xm, stride_xk,       # strides of x
    stride_b0, stride_b1,       # strides of base
    stride_om, stride_ok,       # strides of out
    inv_sqrt_n,                 # 1 / sqrt(n): makes the transform orthogonal
    NM: tl.constexpr,           # chunks per row (m * P1)
    T: tl.constexpr,            # channels per chunk (power of two <= 256)
    P1: tl.constexpr,           # power-of-two factor moved into the mixing matrix (p / T)
    HAS_BASE: tl.constexpr,     # False: base is None (m = 1)
    M_PAD: tl.constexpr,        # NM padded for tl.dot (1 when NM = 1)
    T_PAD: tl.constexpr,        # T padded for tl.dot (>= 16)
    BLOCK_M: tl.constexpr,      # tokens per program (BLOCK_M * M_PAD >= 16)
    UPCAST_BF16: tl.constexpr,  # interpreter + bf16: dots in fp32 (bf16 tl.dot is broken there), RNE output cast
    DOT_PRECISION: tl.constexpr,  # stage 1: "ieee" for fp32 x; ignored for fp16/bf16
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)              # (BLOCK_M,)
    mask_m = offs_m < M
    y, cols, mask_c = _hadamard_rows(x_ptr, base_ptr, offs_m, mask_m, stride_xm, stride_xk, stride_b0, stride_b1,
                                     inv_sqrt_n, NM, T, P1, HAS_BASE, M_PAD, T_PAD, BLOCK_M, UPCAST_BF16,
                                     DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None, None] * stride_om + cols[None, :, :] * stride_ok,
             _to_dtype(y, out_ptr.dtype.element_ty, UPCAST_BF16), mask=mask_m[:, None, None] & mask_c[None, :, :])


@triton.jit
def _hadamard_act_quant_kernel(
    x_ptr,                      # *fp16/bf16/fp32, activations (M, n)
    base_ptr,                   # *fp32, base (m, m) +-1 matrix (unused when not HAS_BASE)
    q_ptr,                      # *int8 codes (M, n), or *uint8 packed int4 codes (M, n/2) when PACK
    scale_ptr,                  # *fp32, per-token scale (M,)
    M,                          # number of tokens (rows)
    stride_xm, stride_xk,       # strides of x
    stride_b0, stride_b1,       # strides of base
    stride_qm, stride_qk,       # strides of the codes (in elements: codes, or bytes when PACK)
    inv_sqrt_n,                 # 1 / sqrt(n)
    QMAX: tl.constexpr,         # 2^(a_bits-1) - 1: largest code; the smallest is -QMAX - 1
    EPS: tl.constexpr,          # floor on the scale
    PACK: tl.constexpr,         # True: int4 codes two per byte (a_bits <= 4, T even)
    NM: tl.constexpr, T: tl.constexpr, P1: tl.constexpr, HAS_BASE: tl.constexpr,     # as in _hadamard_kernel
    M_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)              # (BLOCK_M,)
    mask_m = offs_m < M
    y, cols, mask_c = _hadamard_rows(x_ptr, base_ptr, offs_m, mask_m, stride_xm, stride_xk, stride_b0, stride_b1,
                                     inv_sqrt_n, NM, T, P1, HAS_BASE, M_PAD, T_PAD, BLOCK_M, UPCAST_BF16,
                                     DOT_PRECISION)
    y = _to_dtype(y, x_ptr.dtype.element_ty, UPCAST_BF16).to(tl.float32)   # what `hadamard` stores (fp32: no-op)
    # per-token absmax over the whole row, which is in registers (padding is exactly 0, never wins)
    amax = tl.max(tl.max(tl.abs(y), axis=2), axis=1)                          # (BLOCK_M,)
    scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), EPS)                # same fp32 ops as act_quant
    tl.store(scale_ptr + offs_m, scale, mask=mask_m)
    q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(y, scale[:, None, None])), -QMAX - 1), QMAX)
    mask = mask_m[:, None, None] & mask_c[None, :, :]
    if PACK:
        # codes (2j, 2j + 1) share byte j: split the chunk axis into pairs (T even, so pairs never cross chunks)
        lo, hi = tl.split(tl.reshape(q, (BLOCK_M, M_PAD, T_PAD // 2, 2)))  # (BLOCK_M, M_PAD, T_PAD/2) each
        offs_a = tl.arange(0, M_PAD)
        offs_j = tl.arange(0, T_PAD // 2)
        bytes_ = offs_a[:, None] * (T // 2) + offs_j[None, :]                # byte index in the row
        bmask = mask_m[:, None, None] & ((offs_a[:, None] < NM) & (offs_j[None, :] < T // 2))[None, :, :]
        tl.store(q_ptr + offs_m[:, None, None] * stride_qm + bytes_[None, :, :] * stride_qk,
                 pack_nibbles(lo, hi), mask=bmask)
    else:
        tl.store(q_ptr + offs_m[:, None, None] * stride_qm + cols[None, :, :] * stride_qk, q.to(tl.int8), mask=mask)


# ------------------------------------------------------------------------------------------- wrappers
def _launch_args(x: torch.Tensor, base: torch.Tensor | None, BLOCK_M: int | None):
    """Shared checks and launch parameters: (x2 (M, n), base fp32 or a dummy, plan, BLOCK_M, grid, num_warps)."""
    if x.dtype not in FLOAT_DTYPES:
        raise QVLMError(f"hadamard: unsupported dtype {x.dtype}", "use fp16, bf16 or fp32 activations")
    if x.dim() == 0:
        raise QVLMError("hadamard: x is a scalar", "pass activations of shape (..., n)")
    n = x.shape[-1]
    plan = _plan(n, base)
    check_launch(x)
    x2 = x.reshape(-1, n)                                                    # (M, n); a view when x is contiguous
    M = x2.shape[0]
    b = x2 if base is None else base.to(device=x.device, dtype=torch.float32)  # no copy for kernel_base(n, device)
    row = plan["M_PAD"] * plan["T_PAD"]                                      # padded row length in the tile
    min_rows = max(1, 16 // plan["M_PAD"])                                   # stage 1's MMA needs >= 16 tile rows
    if BLOCK_M is None:
        # GPU: ~8K fp32 values per program (no spills at 4-8 warps), but not more rows than there are tokens.
        # Interpreter: its cost is per program and per op, so many rows per program (interpreter_rows).
        BLOCK_M = interpreter_rows(M, row) if INTERPRET else min(max(1, 8192 // row), triton.next_power_of_2(max(M, 1)))
    if BLOCK_M & (BLOCK_M - 1):
        raise QVLMError(f"hadamard: BLOCK_M={BLOCK_M} is not a power of two", "pass a power of two or None")
    BLOCK_M = max(BLOCK_M, min_rows)
    num_warps = 4 if BLOCK_M * row <= 4096 else 8
    flags = dict(**plan, BLOCK_M=BLOCK_M, UPCAST_BF16=upcast_bf16(x.dtype),
                 DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps)
    return x2, b, flags, (triton.cdiv(M, BLOCK_M),), 1.0 / math.sqrt(n)


def hadamard(x: torch.Tensor, base: torch.Tensor | None = None, BLOCK_M: int | None = None) -> torch.Tensor:
    """Triton x @ kron(base, H_p) / sqrt(n) along the last dim (n = m * p, p = 2^k), in x's dtype; base is
    qvlm.core.hadamard.kernel_base(n) (None for n = 2^k) to equal qvlm.core.hadamard.fwht."""
    x2, b, flags, grid, inv_sqrt_n = _launch_args(x, base, BLOCK_M)
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)        # (M, n)
    if out.shape[0] == 0:
        return out.reshape(x.shape)
    _hadamard_kernel[grid](x2, b, out, x2.shape[0], x2.stride(0), x2.stride(1), b.stride(0), b.stride(1),
                           out.stride(0), out.stride(1), inv_sqrt_n, **flags)
    return out.reshape(x.shape)


def hadamard_act_quant(x: torch.Tensor, base: torch.Tensor | None = None, a_bits: int = 8, pack: bool = False,
                       BLOCK_M: int | None = None):
    """Triton act_quant(hadamard(x, base), a_bits, pack) in one pass: (codes, scale) with codes int8 (..., n) or
    int4 packed two per byte as uint8 (..., n/2), scale fp32 (..., 1); bit-identical to the unfused kernels."""
    _check_act(x, a_bits, pack)
    x2, b, flags, grid, inv_sqrt_n = _launch_args(x, base, BLOCK_M)
    if pack and flags["T"] % 2:
        raise QVLMError(f"hadamard_act_quant: packing needs n/m even, got n={x.shape[-1]} with m={flags['NM']}",
                        "use pack=False (int8 codes) for this size")
    M, n = x2.shape
    q = torch.empty((M, n // 2 if pack else n), dtype=torch.uint8 if pack else torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    lead = x.shape[:-1]
    if M == 0:
        return q.reshape(*lead, q.shape[-1]), scale.reshape(*lead, 1)
    _hadamard_act_quant_kernel[grid](x2, b, q, scale, M, x2.stride(0), x2.stride(1), b.stride(0), b.stride(1),
                                     q.stride(0), q.stride(1), inv_sqrt_n, QMAX=2 ** (a_bits - 1) - 1, EPS=EPS,
                                     PACK=pack, **flags)
    return q.reshape(*lead, q.shape[-1]), scale.reshape(*lead, 1)


def sylvester_ref(p: int, device="cpu") -> torch.Tensor:
    """(p, p) fp32 Sylvester Hadamard matrix [[H, H], [H, -H]] (p a power of two)."""
    h = torch.ones(1, 1, device=device)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], device=device)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


def hadamard_ref(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch x @ kron(base, H_p) / sqrt(n) along the last dim, computed in fp32, returned in x's dtype."""
    if not x.is_floating_point() or x.dim() == 0:
        raise QVLMError(f"hadamard_ref: x has dtype {x.dtype} and shape {tuple(x.shape)}", "pass float (..., n)")
    n = x.shape[-1]
    m, p = _split(n, base)
    y = x.float().reshape(-1, m, p) @ sylvester_ref(p, x.device)              # (M, m, p): H_p on each chunk
    if base is not None:                                                       # kron(B, H)[(c,d),(a,b)] = B[c,a] H[d,b]
        y = torch.einsum("ca,rcb->rab", base.to(device=x.device, dtype=torch.float32), y)
    return (y / math.sqrt(n)).reshape(x.shape).to(x.dtype)


if __name__ == "__main__":
    # python -m kernels.hadamard: median ms (20th / 80th percentile) of the torch reference, the kernel, the unfused
    # transform + act_quant and the fused kernel, fp16 activations, at down_proj input sizes (1536 = 12 x 128,
    # 5120 = 20 x 256, 11008's neighbours 4096 / 8192). Timing does not depend on the +-1 values, so a random
    # +-1 base stands in for the Paley matrix (kernels may not import qvlm.core.hadamard). GPU only.
    assert torch.cuda.is_available(), "benchmark needs a GPU (the interpreter is for correctness only)"
    print(f"# {torch.cuda.get_device_name()}, fp16, torch {torch.__version__}, triton {triton.__version__}")
    print("n, M, ref_ms, hadamard_ms, unfused_w4_quant_ms, fused_w4_quant_ms  (median (p20/p80))")
    for n, m in ((1536, 12), (4096, 1), (5120, 20), (8192, 1)):
        base = None if m == 1 else torch.randint(0, 2, (m, m), device="cuda").float() * 2 - 1
        for M in (1, 16, 2048):
            x = torch.randn(M, n, device="cuda", dtype=torch.float16)
            fns = [lambda: hadamard_ref(x, base), lambda: hadamard(x, base),
                   lambda: act_quant(hadamard(x, base), 4, pack=True),
                   lambda: hadamard_act_quant(x, base, 4, pack=True)]
            for f in fns:
                f()                                                           # warm-up: compile outside timing
            t = [triton.testing.do_bench(f, quantiles=[0.5, 0.2, 0.8]) for f in fns]
            print(f"{n}, {M}, " + ", ".join(f"{a:.4f} ({b:.4f}/{c:.4f})" for a, b, c in t))
