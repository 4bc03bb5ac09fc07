"""Per-token activation quantization (symmetric) -> int8 codes, or int4 codes packed two per byte.

Q-VLM (NeurIPS 2024) quantizes activations with a uniform symmetric grid (`qvlm.core.quant`), qmax = 2^(a_bits-1) - 1.
The step s_m of token m comes from one of three modes; the codes are always
    q_mk = clamp(round(x_mk / s_m), -qmax - 1, qmax)
    dynamic (default)     s_m = max(absmax_k |x_mk| / qmax, 1e-8)                       = quantize_act
    learned clip ratio c  s_m = max(c * absmax_k |x_mk| / qmax, 1e-8)                   (`clip=c`)
                          = qparams_from_minmax(lo * c, hi * c, a_bits, True), lo/hi the row min/max: for c > 0,
                          |fl(v * c)| = fl(|v| * c) and fl(. * c) is monotone, so max(|lo*c|, |hi*c|) = absmax * c
                          exactly in IEEE fp32 (checked across random inputs in the tests)
    static per tensor s   s_m = s for every token, no absmax pass                       (`static_scale=s`)
                          = quantize(x, s, 0, a_bits, True): ActQuantizer's calibrated `a_scale` (zero point 0)
This kernel computes exactly those codes and scales (bit-for-bit: fp32 math, IEEE division via `tl.math.div_rn`,
round-half-to-even like `torch.round`), so the integer GEMMs downstream (`w8a8.py`, `w4a4.py`) see the same
integers as the reference. x / s is clamped to the grid in fp32 *before* rounding (round and clamp to integer bounds
commute), so a small static step cannot overflow the int32 conversion.

    act_quant(x, a_bits, pack, clip=, static_scale=)      Triton: (..., K) float -> codes (..., K) int8 or
                                                          (..., K/2) uint8, scale (..., 1) fp32
    act_quant_ref(x, a_bits, pack, clip=, static_scale=)  the same in plain torch

`clip` (a python float or a 1-element tensor, already clamped by the caller to CLIP_RANGE) and `static_scale` (a
1-element tensor > 0, e.g. `a_scale.abs().clamp_min(1e-8)`) reach the kernel as pointers to 1-element fp32 tensors:
a learned ratio or step lives on the GPU, and reading it as a python number would sync the device on every call.
They are converted to fp32 (a python float rounds the way torch's `fp32_tensor * float` does). Their sign is
checked on the host only for python floats and CPU tensors, for the same reason; the two are mutually exclusive.

Each program owns BLOCK_M tokens and makes two passes over K (one with `static_scale`): the first finds the absmax
of each row, the second quantizes (and packs) it. NaN inputs are not checked here (that would cost a device sync);
`qvlm.core.quant` asserts.

References: Triton tutorial 02-fused-softmax (row-wise reductions); SmoothQuant/QuaRot per-token quantizers;
BRECQ / Q-VLM's learned activation clipping; LSQ (static per-tensor steps).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qvlm.errors import QVLMError

from ._common import INTERPRET, check_launch, interpreter_rows, pack_nibbles, round_half_even
from .pack import pack_int4

EPS = 1e-8          # the floor on the step size, same value as qvlm.core.quant._EPS (an all-zero token keeps scale > 0)


@triton.jit
def _codes(x, scale, QMAX: tl.constexpr):
    """fp32 tile (BLOCK_M, n), per-token steps (BLOCK_M,) -> int32 codes clamp(round(x / scale), -QMAX - 1, QMAX).
    The quotient is IEEE fp32 (`div_rn`, like torch) and is clamped in fp32 *before* rounding: the same integers
    (the bounds are integers), but a small static step cannot push |x / scale| past round_half_even's range."""
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -QMAX - 1.0), QMAX * 1.0)
    return round_half_even(y)


@triton.jit
def _act_quant_kernel(
    x_ptr,                      # *fp16/bf16/fp32, activations (M, K)
    q_ptr,                      # *int8 codes (M, K), or *uint8 packed int4 codes (M, K/2) when PACK
    scale_ptr,                  # *fp32, per-token scale (M,) (output)
    clip_ptr,                   # *fp32 (1,), learned clipping ratio; read only when CLIP
    static_scale_ptr,           # *fp32 (1,), calibrated per-tensor step; read only when STATIC
    M,                          # number of tokens (rows)
    K,                          # number of channels (columns of x)
    stride_xm, stride_xk,       # strides of x
    stride_qm, stride_qk,       # strides of the codes (in elements: codes, or bytes when PACK)
    QMAX: tl.constexpr,         # 2^(a_bits-1) - 1: largest code; the smallest is -QMAX - 1
    EPS: tl.constexpr,          # floor on the dynamic scale
    CLIP: tl.constexpr,         # True: scale = max(clip * absmax / QMAX, EPS)
    STATIC: tl.constexpr,       # True: scale = *static_scale_ptr for every token, no absmax pass
    PACK: tl.constexpr,         # True: write int4 codes two per byte (needs a_bits <= 4 and even K)
    BLOCK_M: tl.constexpr,      # tokens per program
    BLOCK_K: tl.constexpr,      # channels per loop step (an even number)
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # (BLOCK_M,)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm                         # (BLOCK_M, 1) row pointers

    if STATIC:
        # a calibrated step: the same for every token, so there is nothing to reduce
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(static_scale_ptr)
    else:
        # pass 1: absmax of each token over all K channels (masked entries load 0, which never wins)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        if CLIP:
            amax = amax * tl.load(clip_ptr)                              # = max(|lo * clip|, |hi * clip|) exactly
        scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), EPS)      # (BLOCK_M,) fp32, = absmax / qmax
    tl.store(scale_ptr + offs_m, scale, mask=mask_m)

    # pass 2: codes = clamp(round(x / scale)), the division done in IEEE fp32 like torch
    if PACK:
        for k0 in range(0, K, BLOCK_K):
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)                # (BLOCK_K/2,) byte index j <-> codes 2j, 2j+1
            mask = mask_m[:, None] & (2 * offs_j[None, :] < K)
            x_lo = tl.load(x_rows + (2 * offs_j[None, :]) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_rows + (2 * offs_j[None, :] + 1) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            q_lo = _codes(x_lo, scale, QMAX)
            q_hi = _codes(x_hi, scale, QMAX)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_j[None, :] * stride_qk, pack_nibbles(q_lo, q_hi),
                     mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            q = _codes(x, scale, QMAX)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, q.to(tl.int8), mask=mask)


def _scalar(name: str, v, device: torch.device) -> torch.Tensor:
    """clip / static_scale -> a detached 1-element fp32 tensor on x's device. Raises on a wrong size or type, and
    on a value that is not > 0 when the host knows it without a device sync (python floats, CPU tensors)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise QVLMError(f"act_quant: {name} has shape {tuple(v.shape)}, expected one element",
                            f"pass a 0-d / 1-element tensor as {name}")
        host = v.detach().float().reshape(()) if v.device.type == "cpu" else None
        t = v.detach().to(device=device, dtype=torch.float32).reshape(1)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        host = torch.tensor(float(v), dtype=torch.float32)                 # rounded to fp32 like torch's `t * v`
        t = torch.full((1,), float(v), dtype=torch.float32, device=device)  # a fill kernel, no host -> device copy
    else:
        raise QVLMError(f"act_quant: {name}={v!r} is not a number", "pass a python float or a 1-element tensor")
    if host is not None and not bool(host > 0):                             # NaN fails this too
        raise QVLMError(f"act_quant: {name}={float(host):g} must be > 0",
                        "pass the clamped clip ratio (CLIP_RANGE) or the positive step a_scale.abs().clamp_min(1e-8)")
    return t


def _check(x: torch.Tensor, a_bits: int, pack: bool, clip=None, static_scale=None) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QVLMError(f"act_quant: unsupported dtype {x.dtype}", "use fp16, bf16 or fp32 activations")
    if not (2 <= a_bits <= 8) or (pack and a_bits > 4):
        raise QVLMError(f"act_quant: a_bits={a_bits} with pack={pack}", "use a_bits in 2..8 (2..4 when packing)")
    if pack and x.shape[-1] % 2:
        raise QVLMError(f"int4 packing needs an even number of channels, got {x.shape[-1]}", "pad K")
    if clip is not None and static_scale is not None:
        raise QVLMError("act_quant: clip and static_scale were both given",
                        "pass clip (dynamic per-token range) or static_scale (calibrated per-tensor step), not both")
    if static_scale is not None and not isinstance(static_scale, torch.Tensor):
        raise QVLMError(f"act_quant: static_scale must be a 1-element tensor, got {type(static_scale).__name__}",
                        "pass the calibrated step as a tensor (a_scale.abs().clamp_min(1e-8))")


def _params(x: torch.Tensor, clip, static_scale):
    """Validated (clip, static_scale) as 1-element fp32 tensors on x's device, or None."""
    return (None if clip is None else _scalar("clip", clip, x.device),
            None if static_scale is None else _scalar("static_scale", static_scale, x.device))


def act_quant(x: torch.Tensor, a_bits: int = 8, pack: bool = False,
              BLOCK_M: int | None = None, BLOCK_K: int | None = None, *,
              clip: float | torch.Tensor | None = None, static_scale: torch.Tensor | None = None):
    """Triton per-token symmetric quantization: (codes, scale). Codes are int8 (..., K), or with `pack`
    int4 two per byte as uint8 (..., K/2); scale is fp32 (..., 1). Equal to qvlm.core.quant.quantize_act, or with
    `clip` / `static_scale` to qparams_from_minmax(lo * clip, hi * clip) / the static step (module docstring)."""
    _check(x, a_bits, pack, clip, static_scale)
    check_launch(x)
    clip_t, static_t = _params(x, clip, static_scale)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                                # (M, K); a view when x is contiguous
    M = x2.shape[0]
    q = torch.empty((M, K // 2 if pack else K), dtype=torch.uint8 if pack else torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    # GPU: one token per program and (up to 16K channels) the whole row in one step, so pass 2 re-reads it from
    # L1/L2 and even M = 1 (decode) is a single short program; 16 warps keep that tile at <= 32 values per thread.
    # Interpreter: many tokens per program (interpreter_rows), since its cost is per program and per op.
    BLOCK_K = BLOCK_K or max(2, min(triton.next_power_of_2(K), 4096 if INTERPRET else 16384))
    BLOCK_M = BLOCK_M or (interpreter_rows(M, BLOCK_K) if INTERPRET else 1)
    num_warps = max(4, min(16, BLOCK_M * BLOCK_K // 1024))
    grid = (triton.cdiv(M, BLOCK_M),)
    _act_quant_kernel[grid](x2, q, scale,
                            scale if clip_t is None else clip_t,            # unused pointers: any fp32 tensor
                            scale if static_t is None else static_t,
                            M, K, x2.stride(0), x2.stride(1), q.stride(0), q.stride(1),
                            QMAX=2 ** (a_bits - 1) - 1, EPS=EPS, CLIP=clip_t is not None,
                            STATIC=static_t is not None, PACK=pack, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                            num_warps=num_warps)
    return q.reshape(*lead, q.shape[-1]), scale.reshape(*lead, 1)


def act_quant_ref(x: torch.Tensor, a_bits: int = 8, pack: bool = False, *,
                  clip: float | torch.Tensor | None = None, static_scale: torch.Tensor | None = None):
    """Plain torch per-token symmetric quantization, same outputs as act_quant (same arguments)."""
    _check(x, a_bits, pack, clip, static_scale)
    clip_t, static_t = _params(x, clip, static_scale)
    qmax = 2 ** (a_bits - 1) - 1
    xf = x.float()                                                       # (..., K)
    if static_t is not None:
        scale = static_t.reshape([1] * xf.dim()).expand(*xf.shape[:-1], 1).contiguous()    # (..., 1)
    else:
        amax = xf.abs().amax(dim=-1, keepdim=True)                       # (..., 1)
        if clip_t is not None:
            amax = amax * clip_t.reshape(())
        scale = (amax / qmax).clamp_min(EPS)                             # (..., 1)
    q = torch.round(xf / scale).clamp(-qmax - 1, qmax).to(torch.int8)    # (..., K)
    if pack:
        K = x.shape[-1]
        q = pack_int4(q.reshape(-1, K), signed=True).reshape(*x.shape[:-1], K // 2)
    return q, scale
