"""`DeployedLinear`: the packed layer a deployed model runs -- a `kernels.PackedLinear` plus what a QuantLinear may
carry beyond it.

    int4 codes two per byte (w4a16, w4a4) or int8 codes (w8a8) along K, fp32 scale (+ zero_point when asymmetric)
    per output channel or group, multiplied by the Triton GEMMs of `kernels`;
    an optional online input rotation (`input_transform="hadamard"`: QuaRot's down_proj FWHT, `kernels.hadamard`
    on the kernel path for the sizes it handles, `qvlm.core.hadamard.fwht` otherwise and on the reference path),
    applied first;
    an optional smoothing `input_scale` (a SmoothQuant / AWQ scale that could not be folded), divided out next;
    an activation quantizer: "token" (dynamic per-token symmetric), "clip" (per-token ranges shrunk by a learned
    clipping ratio) or "static" (a calibrated symmetric per-tensor step) -- all three computed by the
    `kernels.act_quant` kernel (its `clip` / `static_scale` arguments) -- or "tensor" (dynamic per-tensor ranges,
    and a clip over the whole tensor), whose codes need a reduction across tokens first and are computed in torch
    by `qvlm.core.quant`; the integer GEMM kernels are the same for all of them.

Backend: on CUDA the Triton kernels run; on CPU they run in Triton's interpreter only when TRITON_INTERPRET=1 was
set before `kernels` was first imported (this module imports it), else the plain-torch `*_ref` functions compute
the same integers.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from kernels import (PackedLinear, act_quant, act_quant_ref, can_launch, hadamard, hadamard_supported, pack_int4, w4a4_matmul, w4a4_ref, w4a16_matmul,
                     w4a16_ref, w8a8_matmul, w8a8_ref)
from kernels.pack import PackedWeight

from ..core import quant
from ..core.qlinear import CLIP_RANGE
from ..core.hadamard import INPUT_TRANSFORMS, fwht, kernel_base
from ..errors import QVLMError

ACT_TENSORS = ("input_scale", "a_scale", "a_zero_point", "a_clip")    # optional QuantLinear tensors carried over
ACT_QUANTIZERS = ("token", "clip", "static", "tensor")    # token = dynamic per-token symmetric: the act_quant kernel
_KERNELS = {"on": True}             # reference_backend() turns the Triton launches off (same integers, plain torch)


@contextlib.contextmanager
def reference_backend():
    """Inside the `with`, packed layers compute with the plain-torch `*_ref` functions (the same integer codes and
    int32 accumulators as the kernels), e.g. to evaluate a large packed model on a CPU where Triton's interpreter
    would take hours; the kernels themselves are checked separately (qvlm.deploy.verify.kernel_checks)."""
    _KERNELS["on"] = False
    try:
        yield
    finally:
        _KERNELS["on"] = True



class DeployedLinear(PackedLinear):
    """PackedLinear + what a Q-VLM QuantLinear may carry beyond it (see the module docstring):
    an optional online rotation, an optional smoothing `input_scale` and an activation quantizer ("token" |
    "clip" | "static" in the act_quant kernel, "tensor" in torch; `kernel_act_args`).
    Symmetric layers drop the all-zero `zero_point` buffer (`drop_zero_point`; the kernels never read it)."""

    def __init__(self, *args, act: str = "token", a_granularity: str = "token", input_transform: str | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if act not in ACT_QUANTIZERS:
            raise QVLMError(f"unknown activation quantizer {act!r}", f"use one of {', '.join(ACT_QUANTIZERS)}")
        if input_transform not in INPUT_TRANSFORMS:
            raise QVLMError(f"unknown input_transform {input_transform!r}", "use None or 'hadamard'")
        self.act, self.a_granularity, self.input_transform = act, a_granularity, input_transform
        for name in ACT_TENSORS:
            self.register_buffer(name, None)

    def drop_zero_point(self) -> None:
        """Free the (N, G) all-zero zero_point of a symmetric layer (saves 4 bytes per group in memory and on disk)."""
        if self.symmetric:
            self.zero_point = None

    def packed_weight(self) -> PackedWeight:
        zero_point = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale)
        return PackedWeight(self.qweight, self.scale, zero_point, self.w_bits, self.group_size, self.symmetric,
                            self.container_bits, self.in_features)

    def kernel_act_args(self) -> dict | None:
        """`act_quant` keyword arguments that compute this layer's activation codes in the kernel, or None when only
        torch computes them: per-token dynamic ({}), a learned clip ratio per token (`clip`, clamped to CLIP_RANGE
        as QuantLinear uses it) or a symmetric static per-tensor step (`static_scale`). Dynamic per-tensor ranges and
        a clip over the whole tensor need a reduction across tokens first, so they stay in torch (`act_codes`)."""
        if self.act == "token":
            return {}
        if self.act == "clip" and self.a_granularity == "token" and self.a_clip.numel() == 1:
            return {"clip": self.a_clip.detach().float().clamp(*CLIP_RANGE).reshape(1)}
        if self.act == "static" and self.a_scale.numel() == 1 and (self.a_zero_point is None
                                                                   or not bool(self.a_zero_point.any())):
            return {"static_scale": self.a_scale.detach().float().abs().clamp_min(1e-8).reshape(1)}
        return None

    def act_codes(self, x2: torch.Tensor):
        """(M, K) activations -> int8 codes (M, K) and fp32 scale (M, 1), exactly as QuantLinear.quant_input."""
        if self.act == "static":                                 # calibrated per-tensor step (LSQ)
            scale, zero_point = self.a_scale.abs().clamp_min(1e-8), self.a_zero_point
        elif self.act == "clip":                                 # dynamic range shrunk by a learned ratio
            per_token = self.a_granularity == "token"
            lo = x2.amin(dim=-1, keepdim=True) if per_token else x2.min()
            hi = x2.amax(dim=-1, keepdim=True) if per_token else x2.max()
            clip = self.a_clip.clamp(*CLIP_RANGE)
            scale, zero_point = quant.qparams_from_minmax(lo.float() * clip, hi.float() * clip, self.a_bits, True)
        else:                                                    # "tensor": dynamic, one range per tensor
            scale, zero_point = quant.act_qparams(x2, self.a_bits, True, "tensor")
        scale = scale.to(x2.dtype)
        zero_point = torch.zeros_like(scale) if zero_point is None else zero_point.to(x2.dtype)
        q = quant.quantize(x2, scale, zero_point, self.a_bits, symmetric=True).to(torch.int8)  # (M, K)
        return q, scale.float().reshape(-1, 1).expand(x2.shape[0], 1).contiguous()         # (M, 1)

    def rotate(self, x2: torch.Tensor) -> torch.Tensor:
        """The online Hadamard of (M, K) inputs as forward applies it: the Triton FWHT where it launches and handles
        the size, else qvlm.core.hadamard.fwht (equal up to fp32 summation order, kernels/hadamard.py)."""
        base = kernel_base(self.in_features, x2.device)
        launch = can_launch(x2) and _KERNELS["on"]
        return hadamard(x2, base) if launch and hadamard_supported(self.in_features, base) else fwht(x2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """PackedLinear.forward's dispatch, plus the online rotation, input_scale and the torch activation
        quantizers: the same kernels, same integers."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                                    # (M, K)
        launch = can_launch(x2) and _KERNELS["on"]
        if self.input_transform == "hadamard":                                  # online rotation (weight holds W H)
            x2 = self.rotate(x2)
        if self.input_scale is not None:
            x2 = x2 / self.input_scale.to(x2.dtype)              # smoothing (weight holds W * input_scale)
        zero_point = None if self.symmetric else self.zero_point
        if self.mode == "w4a16":
            y = (w4a16_matmul(x2, self.qweight, self.scale, zero_point, self.symmetric) if launch
                 else w4a16_ref(x2, self.qweight, self.scale, zero_point, self.symmetric))
        else:
            pack = self.mode == "w4a4"                                          # int4 codes two per byte
            kw = self.kernel_act_args()
            if kw is None:                                                      # per-tensor ranges: torch codes
                q, a_scale = self.act_codes(x2)
                a = pack_int4(q, signed=True) if pack else q
            elif launch:
                a, a_scale = act_quant(x2, self.a_bits, pack=pack, **kw)
            else:
                a, a_scale = act_quant_ref(x2, self.a_bits, pack=pack, **kw)
            if pack:
                y = (w4a4_matmul if launch else w4a4_ref)(a, a_scale, self.qweight, self.scale, zero_point,
                                                          self.symmetric, out_dtype=x.dtype)
            else:
                y = (w8a8_matmul if launch else w8a8_ref)(a, a_scale, self.qweight, self.scale, zero_point,
                                                          out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def spec(self) -> dict:
        """Constructor settings + which optional tensors exist (stored per layer in qvlm_packed.json)."""
        return dict(in_features=self.in_features, out_features=self.out_features, w_bits=self.w_bits,
                    a_bits=self.a_bits, group_size=self.group_size, symmetric=self.symmetric,
                    bias=self.bias is not None, act=self.act, a_granularity=self.a_granularity, mode=self.mode,
                    input_transform=self.input_transform, tensors=[n for n in ACT_TENSORS if getattr(self, n) is not None])

    def extra_repr(self) -> str:
        extra = "".join(f", {n}" for n in ACT_TENSORS if getattr(self, n) is not None)
        r = f", input_transform={self.input_transform}" if self.input_transform else ""
        return super().extra_repr() + f", act={self.act}{extra}{r}"


def is_packed(m: nn.Module) -> bool:
    """True for a kernel-backed packed layer (kernels.PackedLinear or its DeployedLinear subclass)."""
    return type(m).__name__ in ("PackedLinear", "DeployedLinear") and hasattr(m, "qweight")


def packed_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, packed layer) pairs in module order."""
    return [(n, m) for n, m in model.named_modules() if is_packed(m)]


def scheme(model: nn.Module) -> dict:
    """Summary of the packed layers: a name like 'w4a4' / 'w4a16-g32', the kernels used and their counts."""
    specs = [layer_spec(m) for _, m in packed_linears(model)]
    tags = sorted({f"w{s['w_bits']}a{s['a_bits']}" + (f"-g{s['group_size']}" if s["group_size"] else "")
                   + ("" if s["symmetric"] else "-asym") for s in specs})
    count = lambda key: {v: sum(s[key] == v for s in specs) for v in sorted({s[key] for s in specs})}  # noqa: E731
    return dict(name="+".join(tags) or "none", kernels=count("mode"), activations=count("act"), layers=len(specs),
                weights="int4 two per byte (w4a16, w4a4) / int8 (w8a8) codes along K; fp32 scale (+ zero_point "
                        "when asymmetric) per output channel or group",
                activation_quantization="dynamic per-token symmetric (kernels.act_quant) unless `act` says otherwise")


def layer_spec(m: nn.Module) -> dict:
    """Constructor settings of a packed layer (DeployedLinear.spec, or a plain PackedLinear's)."""
    if hasattr(m, "spec"):
        return m.spec()
    return dict(in_features=m.in_features, out_features=m.out_features, w_bits=m.w_bits, a_bits=m.a_bits,
                group_size=m.group_size, symmetric=m.symmetric, bias=m.bias is not None, act="token",
                a_granularity="token", mode=m.mode, input_transform=None, tensors=[])
