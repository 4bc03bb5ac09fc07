"""Uniform integer quantization primitives: the reference every other path (methods, kernels) is checked against.

Vocabulary (used everywhere in this repo): `w_bits`, `a_bits`, `group_size`, `scale`, `zero_point`.

    quantize(x, scale, zero_point, bits, symmetric)   -> q  (integers stored in x's float dtype)
    dequantize(q, scale, zero_point)                   -> x_hat = (q - zero_point) * scale
    fake_quant(x, ...)                                 =  dequantize(quantize(x, ...))

Grids (b = bits):
    symmetric : q in [-2^(b-1), 2^(b-1) - 1], zero_point = 0, scale = absmax / (2^(b-1) - 1)
    asymmetric: q in [0, 2^b - 1],            zero_point = round(-min / scale), scale = (max - min) / (2^b - 1)

Weights are quantized per output channel (`group_size = 0`) or per group of `group_size` input channels, each
range from the weights' min/max (`w_clip = "minmax"`) or shrunk to the ratio that minimises the group's rounding
error (`w_clip = "mse"`, the grid search of GPTQ's `Quantizer(mse=True)` that QuaRot runs as `--w_clip`);
activations per token (dynamic: one scale per row of the last dimension) or per tensor (static, calibrated).
`bits = 16` means "not quantized" (identity) everywhere, so a 16-bit QuantLinear equals the FP layer.

References: GPTQ `quant.py::quantize`; gpt-fast `quantize.py::get_group_qparams`; llm-awq `pseudo_quantize_tensor`;
NF4 codebook from QLoRA (Dettmers et al. 2023) / bitsandbytes `create_normal_map`.
"""
from __future__ import annotations

import torch

from ..errors import QVLMError

FP_BITS = 16                      # "no quantization"
VALID_BITS = tuple(range(2, 9)) + (FP_BITS,)
_EPS = 1e-8                       # floor on the step size: an all-zero group must not give scale = 0 (inf/NaN)
W_CLIPS = ("minmax", "mse")       # how a weight group's range is chosen (weight_qparams)
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4   # the search of w_clip "mse": ratios 1, 0.99, ..., 0.21; |err|^2.4


def check_bits(bits, name: str = "bits") -> int:
    """Validate a bit-width: an int in 2..8, or 16 for 'keep FP'. Raises QVLMError otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise QVLMError(f"unsupported {name}={bits!r}", f"use an integer in 2..8 (or 16 to keep full precision)")
    return bits


def check_group_size(group_size: int, in_features: int) -> int:
    """group_size 0 = per output channel; otherwise it must divide the layer's input width."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise QVLMError(f"unsupported group_size={group_size!r}", "use 0 (per channel) or a positive integer")
    if group_size and in_features % group_size:
        raise QVLMError(f"group_size={group_size} does not divide the input width {in_features}",
                        f"use 0 (per channel) or a divisor of {in_features}")
    return group_size


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() with a straight-through gradient (d round(x)/dx := 1)."""
    return (x.round() - x).detach() + x


def qparams_from_minmax(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    """Step size and zero point that map [xmin, xmax] (broadcastable tensors) onto the b-bit grid."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = (absmax / qmax).clamp_min(_EPS)
        zero_point = torch.zeros_like(scale)
    else:
        xmin = xmin.clamp(max=0)               # the grid always contains 0 (zero padding stays exact)
        xmax = xmax.clamp(min=0)
        scale = ((xmax - xmin) / (qmax - qmin)).clamp_min(_EPS)
        zero_point = (qmin - xmin / scale).round().clamp(qmin, qmax)
    return scale, zero_point


def quantize(x, scale, zero_point, bits: int, symmetric: bool, ste: bool = False) -> torch.Tensor:
    """Integer codes q = clamp(round(x / scale) + zero_point, qmin, qmax), kept in x's float dtype."""
    assert not torch.isnan(x).any(), "quantize: NaN input"
    qmin, qmax = qrange(bits, symmetric)
    r = round_ste(x / scale) if ste else torch.round(x / scale)
    return torch.clamp(r + zero_point, qmin, qmax)


def dequantize(q, scale, zero_point) -> torch.Tensor:
    """x_hat = (q - zero_point) * scale."""
    return (q - zero_point) * scale


def fake_quant(x, scale, zero_point, bits: int, symmetric: bool, ste: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)): the simulated-quantization reference."""
    if bits >= FP_BITS:
        return x
    return dequantize(quantize(x, scale, zero_point, bits, symmetric, ste), scale, zero_point)


# ----------------------------------------------------------------------------------------------------- weights
def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, group_size); group_size 0 = one group per output channel."""
    assert w.dim() == 2, f"weights must be 2-D (out, in), got {tuple(w.shape)}"
    out_f, in_f = w.shape
    g = group_size or in_f
    check_group_size(g, in_f)
    return w.reshape(out_f, in_f // g, g)


def check_w_clip(w_clip: str) -> str:
    if w_clip not in W_CLIPS:
        raise QVLMError(f"unknown w_clip {w_clip!r}", f"use one of {', '.join(W_CLIPS)}")
    return w_clip


@torch.no_grad()
def mse_clip_ratio(w: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = True) -> torch.Tensor:
    """Per-(channel, group) clip ratio r in {1, 0.99, ..., 1 - MSE_MAX_SHRINK + 0.01} minimising sum |Q(w; r) - w|^2.4
    over the group, where Q(w; r) rounds w onto the grid of the range [r min, r max] (data-free: weights only).
    Shape (out, n_groups); r = 1 where no shrink helps. Reference: GPTQ `quant.py::Quantizer.find_params(mse=True)`."""
    wg = _grouped(w.float(), group_size)                         # (out, n_groups, g)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    best = torch.full_like(wmin, float("inf"))
    ratio = torch.ones_like(wmin)
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        r = 1 - i / MSE_GRID
        scale, zero_point = qparams_from_minmax(wmin * r, wmax * r, bits, symmetric)
        err = (fake_quant(wg, scale[..., None], zero_point[..., None], bits, symmetric) - wg).abs_().pow_(MSE_NORM)
        err = err.sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        ratio = torch.where(better, torch.full_like(ratio, r), ratio)
    return ratio


def weight_qparams(w: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
                   clip_ratio: float | torch.Tensor = 1.0, w_clip: str = "minmax"):
    """Per-channel / per-group (scale, zero_point), each shaped (out, n_groups). `clip_ratio` shrinks the range;
    w_clip "mse" searches it per group instead (mse_clip_ratio; then clip_ratio must stay 1)."""
    if check_w_clip(w_clip) == "mse":
        assert not torch.is_tensor(clip_ratio) and clip_ratio == 1, "w_clip 'mse' searches the clip ratio itself"
        clip_ratio = mse_clip_ratio(w, bits, group_size, symmetric)
    wg = _grouped(w.float(), group_size)                         # (out, n_groups, g)
    xmin = wg.amin(dim=-1) * clip_ratio
    xmax = wg.amax(dim=-1) * clip_ratio
    return qparams_from_minmax(xmin, xmax, bits, symmetric)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
                    scale=None, zero_point=None):
    """Integer weight codes (out, in) (int8 if symmetric, uint8 if not: 8-bit asymmetric codes reach 255),
    with scale and zero_point (out, n_groups)."""
    if scale is None:
        scale, zero_point = weight_qparams(w, bits, group_size, symmetric)
    wg = _grouped(w.float(), group_size)
    q = quantize(wg, scale[..., None], zero_point[..., None], bits, symmetric)
    return q.reshape(w.shape).to(torch.int8 if symmetric else torch.uint8), scale, zero_point


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_weight: (out, in) float32 weights."""
    out_f, in_f = q.shape
    n_groups = scale.shape[-1]
    qg = q.float().reshape(out_f, n_groups, in_f // n_groups)
    return dequantize(qg, scale[..., None], zero_point[..., None]).reshape(out_f, in_f)


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = True,
                      scale=None, zero_point=None, ste: bool = False) -> torch.Tensor:
    """Round-to-nearest fake-quantized weights, same shape and dtype as w."""
    if bits >= FP_BITS:
        return w
    if scale is None:
        scale, zero_point = weight_qparams(w, bits, group_size, symmetric)
    wg = _grouped(w, group_size)
    out = fake_quant(wg, scale[..., None].to(w.dtype), zero_point[..., None].to(w.dtype), bits, symmetric, ste)
    return out.reshape(w.shape)


# ------------------------------------------------------------------------------------------------- activations
def act_qparams(x: torch.Tensor, bits: int, symmetric: bool = True, granularity: str = "token"):
    """Dynamic activation (scale, zero_point): per token -> shape (..., 1); per tensor -> scalars."""
    if granularity == "token":
        xmin, xmax = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    elif granularity == "tensor":
        xmin, xmax = x.min(), x.max()
    else:
        raise QVLMError(f"unknown activation granularity {granularity!r}", "use 'token' or 'tensor'")
    return qparams_from_minmax(xmin.float(), xmax.float(), bits, symmetric)


def _fake_quant_token_symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fake_quant(x, *act_qparams(x, bits, True, "token")) without autograd, in 6 elementwise passes instead of 10:
    absmax = amax|x| equals max(|amin|, |amax|) exactly, and zero_point = 0 drops the add and the subtract (only the
    sign of an exact zero may differ). The evaluation of every dynamic per-token model runs this."""
    qmin, qmax = qrange(bits, True)
    absmax = x.abs().amax(dim=-1, keepdim=True).float()
    assert not torch.isnan(absmax).any(), "quantize: NaN input"         # amax propagates NaN: the same contract
    scale = (absmax / qmax).clamp_min(_EPS).to(x.dtype)
    return (x / scale).round_().clamp_(qmin, qmax).mul_(scale)


def fake_quant_act(x: torch.Tensor, bits: int, symmetric: bool = True, granularity: str = "token",
                   scale=None, zero_point=None, ste: bool = False) -> torch.Tensor:
    """Fake-quantize activations. With `scale` given (static, calibrated) it is used as is; else dynamic."""
    if bits >= FP_BITS:
        return x
    if scale is None and symmetric and granularity == "token" and not torch.is_grad_enabled():
        return _fake_quant_token_symmetric(x, bits)
    if scale is None:
        scale, zero_point = act_qparams(x, bits, symmetric, granularity)
    return fake_quant(x, scale.to(x.dtype), zero_point.to(x.dtype), bits, symmetric, ste)


def quantize_act(x: torch.Tensor, bits: int, symmetric: bool = True):
    """Per-token integer activation codes (int8 if symmetric, uint8 if not; same shape) plus scale/zero_point (..., 1) in fp32."""
    scale, zero_point = act_qparams(x.float(), bits, symmetric, "token")
    q = quantize(x.float(), scale, zero_point, bits, symmetric)
    return q.to(torch.int8 if symmetric else torch.uint8), scale, zero_point


# --------------------------------------------------------------------------------------------------------- NF4
# QLoRA's NormalFloat-4 codebook (bitsandbytes `create_normal_map(offset=0.9677...)`), ordered, 16 values.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
NF4_BLOCK = 64                    # bitsandbytes' default block size for 4-bit weights


def fake_quant_nf4(w: torch.Tensor, block_size: int = NF4_BLOCK) -> torch.Tensor:
    """bitsandbytes-style NF4 weights: per block of `block_size` consecutive weights, absmax-normalise,
    snap to the nearest NF4 code, rescale. (The official Q-VLM code's weight format; double quantization of
    the absmax constants is not simulated: it changes them by < 0.5 %.)"""
    flat = w.reshape(-1)
    pad = (-flat.numel()) % block_size
    fb = torch.nn.functional.pad(flat.float(), (0, pad)).reshape(-1, block_size)
    absmax = fb.abs().amax(dim=1, keepdim=True).clamp_min(_EPS)
    code = NF4_CODEBOOK.to(w.device)
    idx = ((fb / absmax)[..., None] - code).abs().argmin(dim=-1)
    out = (code[idx] * absmax).reshape(-1)[: flat.numel()]
    return out.reshape(w.shape).to(w.dtype)
