"""QuantLinear: the fake-quantized nn.Linear every method runs in, model swapping, and quantized save / load.

Q-VLM (Wang et al., NeurIPS 2024) §3 quantizes the weights and input activations of every linear layer of the
vision encoder, projector and LLM; the official code does it with a patched bitsandbytes `Linear4bit` whose
`QuantAct` fake-quantizes the input (docs/method.md). `QuantLinear` is the general, tested version:

    y = fake_quant_w(W) @ fake_quant_a(x / input_scale)^T + b

  weights      per output channel (group_size 0) or per group of input channels; symmetric or asymmetric;
               uniform integer grid ("int") or bitsandbytes NF4 ("nf4"). Stored step sizes `w_scale`,
               `w_zero_point` (out, n_groups) so methods can clip them (AWQ) or fix them (GPTQ).
  activations  dynamic per token (one range per row) or static per tensor (a range calibrated on data);
               optional learnable step (`a_scale`, static) or clipping ratio (`a_clip`, dynamic), trained
               with the straight-through estimator (LSQ-style; Esser et al. 2020).
  rounding     optional learnable rounding offsets `round_logits` (AdaRound's rectified sigmoid; Nagel et al.
               2020), used by qvlm.methods.reconstruct; `freeze()` bakes the hard rounding into the weight.
  input_scale  optional per-input-channel smoothing scale (SmoothQuant / AWQ when it cannot be folded into the
               previous op): the layer computes (x / s) @ (W * s)^T, identical in FP.
  input_transform  optional online rotation of the input, "hadamard": the layer computes (x H) @ (W H)^T with
               H = hadamard_matrix(n) / sqrt(n) orthogonal (a run-time FWHT; QuaRot's down_proj rotation, set by
               `qvlm.transforms.rotate` through `RotatedInputLinear`), identical in FP. Order: rotate, then
               divide by input_scale, then quantize -- `prepare_input`.
  16 bits      means "not quantized": a QuantLinear with w_bits = a_bits = 16 is exactly the FP layer.

All rounding / grids go through `qvlm.quant` (the single reference). Swapping: `quantize_model(model, qcfg)`
replaces every nn.Linear inside the scoped blocks (`qvlm.models.llava.linear_layers`); lm_head and the
embeddings stay FP. Save / load: `save_quantized` writes integer weight codes + quantization parameters (+ the
other tensors of the quantized blocks, e.g. norms that smoothing rescaled) and `qvlm_quant.json` with the config
and the base model; `load_quantized(dir)` rebuilds the model, and `qvlm.models.load(dir)` delegates here.

References: 1) GPTQ `quant.py::Quantizer` 2) llm-awq `qmodule` / `pseudo_quantize_tensor`
3) BRECQ / QDrop `quant_layer.py::QuantModule`, `adaptive_rounding.py::AdaRoundQuantizer`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig
from ..errors import QVLMError
from ..models import llava
from . import quant
from .hadamard import INPUT_TRANSFORMS, rotate_input

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020, Eq. 23):
#     h(a) = clamp(sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0, 1)
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """AdaRound's soft rounding offset h(alpha) in [0, 1]."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """alpha such that h(alpha) = h (for h in [0, 1)), used to start learned rounding at round-to-nearest."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)


CLIP_RANGE = (0.05, 1.0)          # a learned clipping ratio is used clamped to this range (straight-through: a
                                  # ratio pushed past a bound still gets gradient and can come back)
ACT_TENSORS = ("a_scale", "a_zero_point", "a_clip")   # what an ActQuantizer may carry
_OPTIONAL = ("input_scale", "round_logits")           # optional tensors of the layer itself


class RotatedInputLinear(nn.Linear):
    """An FP nn.Linear whose input is rotated online: y = (x H) @ W'^T + b with W' = W H (H orthogonal), which
    equals the original layer. Made by `qvlm.transforms.rotate` (QuaRot's online Hadamard on down_proj);
    `QuantLinear.from_linear` carries the rotation over, so quantization sees the rotated input."""

    input_transform = "hadamard"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "RotatedInputLinear":
        """Wrap `linear` (its tensors are shared); the caller rewrites the weight to W H."""
        r = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        r.weight, r.bias = linear.weight, linear.bias
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rotate_input(x, self.input_transform), self.weight, self.bias)


def clip_ratio(a_clip: torch.Tensor) -> torch.Tensor:
    """The clipping ratio a layer uses: a_clip clamped to CLIP_RANGE, with a straight-through gradient."""
    return a_clip + (a_clip.clamp(*CLIP_RANGE) - a_clip).detach()


class ActQuantizer(nn.Module):
    """The activation quantizer of one input tensor. Linears that read the same tensor (q|k|v, gate|up) share ONE
    ActQuantizer object (`share_act_quantizer`), so they quantize it identically: one set of codes, which is what a
    fused integer GEMM runs.

        dynamic  per token (one range per row) or per tensor (the batch range), optionally shrunk by a learned
                 clipping ratio `a_clip` (a scalar, STE-trained; BRECQ / Q-VLM's activation search)
        static   per tensor: a step `a_scale` (+ `a_zero_point`) calibrated on data (min/max, then LSQ-trainable)
    """

    def __init__(self, a_bits: int = 4, a_symmetric: bool = True, a_granularity: str = "token"):
        super().__init__()
        self.a_bits = quant.check_bits(a_bits, "a_bits")
        if a_granularity not in ("token", "tensor"):
            raise QVLMError(f"unknown a_granularity {a_granularity!r}", "use 'token' or 'tensor'")
        self.a_symmetric, self.a_granularity = a_symmetric, a_granularity
        for name in ACT_TENSORS:
            self.register_buffer(name, None)
        self.drop_prob = 0.0             # QDrop: probability of keeping an element unquantized (training only)
        self.observing = False           # record input ranges (static calibration) instead of quantizing
        self.obs_mask = None             # optional (B, T) bool mask of valid tokens while observing
        self._obs_min = self._obs_max = None

    @property
    def enabled(self) -> bool:
        return self.a_bits < quant.FP_BITS

    def set_tensor(self, name: str, value: torch.Tensor | None, learnable: bool = False) -> None:
        """(Re)register a_scale / a_zero_point / a_clip as a buffer, or as a trainable Parameter with `learnable`."""
        _set_tensor(self, name, value, learnable)

    @property
    def needs_calibration(self) -> bool:
        """Static per-tensor activations whose range has not been calibrated yet."""
        return self.enabled and self.a_granularity == "tensor" and self.a_scale is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x (..., C); straight-through rounding when gradients are enabled."""
        if not self.enabled:
            return x
        if self.observing:
            self._observe(x)
            return x
        ste = torch.is_grad_enabled()
        if self.a_granularity == "tensor" and self.a_scale is not None:              # static, calibrated
            xq = quant.fake_quant_act(x, self.a_bits, self.a_symmetric, "tensor",
                                      self.a_scale.abs().clamp_min(1e-8), self.a_zero_point, ste=ste)
        elif self.a_clip is not None:                                                 # dynamic, learned clip
            lo = x.amin(dim=-1, keepdim=True) if self.a_granularity == "token" else x.min()
            hi = x.amax(dim=-1, keepdim=True) if self.a_granularity == "token" else x.max()
            clip = clip_ratio(self.a_clip)
            scale, zero_point = quant.qparams_from_minmax(lo.detach().float() * clip, hi.detach().float() * clip,
                                                          self.a_bits, self.a_symmetric)
            xq = quant.fake_quant(x, scale.to(x.dtype), zero_point.to(x.dtype), self.a_bits, self.a_symmetric, ste)
        else:                                            # dynamic per token (or per tensor if not calibrated yet)
            xq = quant.fake_quant_act(x, self.a_bits, self.a_symmetric, self.a_granularity, ste=ste)
        if self.drop_prob > 0 and torch.is_grad_enabled():   # QDrop (Wei et al. 2022): keep some elements FP
            xq = torch.where(torch.rand_like(x) < self.drop_prob, x, xq)
        return xq

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if self.obs_mask is not None and tuple(self.obs_mask.shape) == tuple(x.shape[:-1]):
            x = x[self.obs_mask.bool()]
        x = x.float()
        lo, hi = x.min(), x.max()
        self._obs_min = lo if self._obs_min is None else torch.minimum(self._obs_min, lo)
        self._obs_max = hi if self._obs_max is None else torch.maximum(self._obs_max, hi)

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Turn the observed min/max into the static per-tensor (a_scale, a_zero_point)."""
        self.observing = False
        if self._obs_min is None:
            return
        scale, zero_point = quant.qparams_from_minmax(self._obs_min, self._obs_max, self.a_bits, self.a_symmetric)
        self.set_tensor("a_scale", scale)
        self.set_tensor("a_zero_point", zero_point)
        self._obs_min = self._obs_max = None

    @torch.no_grad()
    def freeze(self) -> None:
        """Learned tensors become buffers (a_scale as |a_scale|, a_clip clamped to CLIP_RANGE)."""
        if self.a_scale is not None:
            self.set_tensor("a_scale", self.a_scale.detach().abs())
        if self.a_clip is not None:
            self.set_tensor("a_clip", self.a_clip.detach().clamp(*CLIP_RANGE))
        self.drop_prob, self.observing = 0.0, False

    def extra_repr(self) -> str:
        return f"a_bits={self.a_bits}, {self.a_granularity}" + ("" if self.a_symmetric else ", asym")


def _set_tensor(mod: nn.Module, name: str, value: torch.Tensor | None, learnable: bool) -> None:
    if name in mod._parameters:
        del mod._parameters[name]
    if name in mod._buffers:
        del mod._buffers[name]
    if value is not None and learnable:
        mod.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=True))
    else:
        mod.register_buffer(name, None if value is None else value.detach())


class QuantLinear(nn.Linear):
    """Fake-quantized replacement of nn.Linear (see the module docstring).

    It subclasses nn.Linear so structure discovery (qvlm.models.llava.linear_layers) finds the same layers, under
    the same keys, in a quantized model as in the FP one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int = 4, a_bits: int = 4,
                 group_size: int = 0, w_symmetric: bool = True, a_symmetric: bool = True, a_granularity: str = "token",
                 weight_format: str = "int", input_transform: str | None = None, w_clip: str = "minmax", device=None,
                 dtype=None):
        nn.Module.__init__(self)                         # not nn.Linear.__init__: no random init of the weight
        self.in_features, self.out_features = in_features, out_features
        if input_transform not in INPUT_TRANSFORMS:
            raise QVLMError(f"unknown input_transform {input_transform!r}", "use None or 'hadamard'")
        self.input_transform = input_transform
        self.w_bits = quant.check_bits(w_bits, "w_bits")
        self.group_size = quant.check_group_size(group_size, in_features)
        if weight_format not in ("int", "nf4"):
            raise QVLMError(f"unknown weight_format {weight_format!r}", "use 'int' or 'nf4'")
        self.w_symmetric, self.weight_format = w_symmetric, weight_format
        self.w_clip = quant.check_w_clip(w_clip)     # how reset_weight_qparams picks each group's range
        self.act = ActQuantizer(a_bits, a_symmetric, a_granularity)     # shared by the linears of one unit
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        n_groups = in_features // (group_size or in_features)
        self.register_buffer("w_scale", torch.ones(out_features, n_groups, device=device))        # (out, n_groups)
        self.register_buffer("w_zero_point", torch.zeros(out_features, n_groups, device=device))  # (out, n_groups)
        for name in _OPTIONAL:
            self.register_buffer(name, None)
        # run-time switches (not state): methods flip them during calibration
        self.quant_enabled = True        # False: behave exactly like the FP layer (used by AWQ's per-group search)
        self.weight_on_grid = False      # True after freeze(): `weight` already holds the dequantized grid values
        self.round_mode = "hard"         # learned rounding: "soft" (training) | "hard"

    # the activation quantizer's settings and tensors, read through the layer (they live on the shared self.act)
    a_bits = property(lambda self: self.act.a_bits)
    a_symmetric = property(lambda self: self.act.a_symmetric)
    a_granularity = property(lambda self: self.act.a_granularity)
    a_scale = property(lambda self: self.act.a_scale)
    a_zero_point = property(lambda self: self.act.a_zero_point)
    a_clip = property(lambda self: self.act.a_clip)

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, qcfg: QuantConfig, **overrides) -> "QuantLinear":
        """Wrap `linear` (its weight/bias tensors are shared, not copied) with the settings of `qcfg`."""
        kw = dict(w_bits=qcfg.w_bits, a_bits=qcfg.a_bits, group_size=qcfg.group_size, w_symmetric=qcfg.w_symmetric,
                  a_symmetric=qcfg.a_symmetric, a_granularity=qcfg.a_granularity, weight_format=qcfg.weight_format,
                  input_transform=getattr(linear, "input_transform", None), w_clip=qcfg.w_clip)
        kw.update(overrides)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kw)
        q.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False) if linear.bias is not None else None
        n_groups = q.w_scale.shape[1]
        q.w_scale = torch.ones(q.out_features, n_groups, device=q.weight.device)
        q.w_zero_point = torch.zeros(q.out_features, n_groups, device=q.weight.device)
        q.reset_weight_qparams()
        return q

    def spec(self) -> dict:
        """The constructor settings (stored per layer in qvlm_quant.json)."""
        return dict(w_bits=self.w_bits, a_bits=self.a_bits, group_size=self.group_size, w_symmetric=self.w_symmetric,
                    a_symmetric=self.a_symmetric, a_granularity=self.a_granularity, weight_format=self.weight_format,
                    input_transform=self.input_transform, w_clip=self.w_clip)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        r = f", input_transform={self.input_transform}" if self.input_transform else ""
        return (f"{self.in_features}, {self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}{g}, "
                f"a={self.a_granularity}, weight_format={self.weight_format}{r}")

    @property
    def quantizes_weight(self) -> bool:
        return self.w_bits < quant.FP_BITS

    @property
    def quantizes_act(self) -> bool:
        return self.a_bits < quant.FP_BITS

    def set_tensor(self, name: str, value: torch.Tensor | None, learnable: bool = False) -> None:
        """(Re)register an optional tensor as a buffer, or as a trainable Parameter with `learnable`; the
        activation tensors (a_scale, a_zero_point, a_clip) go to the shared activation quantizer."""
        _set_tensor(self.act if name in ACT_TENSORS else self, name, value, learnable)

    # ---------------------------------------------------------------------------------------------- weights
    @torch.no_grad()
    def reset_weight_qparams(self, clip_ratio: float | torch.Tensor | None = None) -> None:
        """Recompute (w_scale, w_zero_point) from the current weight (after a method rescaled it): each group's range
        by the layer's `w_clip` rule, or shrunk by a given `clip_ratio` (a method's own search, e.g. AWQ's)."""
        if self.weight_format == "int" and self.quantizes_weight:
            rule = "minmax" if clip_ratio is not None else self.w_clip
            scale, zero_point = quant.weight_qparams(self.weight.float(), self.w_bits, self.group_size,
                                                     self.w_symmetric, 1.0 if clip_ratio is None else clip_ratio, rule)
            self.w_scale, self.w_zero_point = scale, zero_point
        self.weight_on_grid = False

    def _grid(self):
        """Weight grouped (out, n_groups, g) in fp32 with its step / zero point broadcast as (out, n_groups, 1)."""
        wg = self.weight.float().reshape(self.out_features, self.w_scale.shape[1], -1)
        return wg, self.w_scale[..., None], self.w_zero_point[..., None]

    def init_learned_rounding(self) -> None:
        """Start AdaRound: logits with h(alpha) = frac(W / scale), so hard rounding == round-to-nearest."""
        if self.weight_format != "int":
            raise QVLMError("learned rounding needs weight_format 'int'",
                            "use weight_format='int' (NF4 has no rounding offsets)")
        if self.weight_on_grid:
            raise QVLMError("this layer is already frozen", "initialise learned rounding before freeze()")
        wg, s, _ = self._grid()
        rest = (wg / s - torch.floor(wg / s)).clamp(0, 1 - 1e-4)                   # (out, n_groups, g)
        self.set_tensor("round_logits", inverse_rectified_sigmoid(rest).reshape(self.weight.shape), learnable=True)
        self.round_mode = "soft"

    def rounding_offsets(self) -> torch.Tensor:
        """h in [0, 1]: soft (rectified sigmoid) or hard ({0, 1}) rounding offsets, (out, in)."""
        if self.round_mode == "soft":
            return rectified_sigmoid(self.round_logits)
        return (self.round_logits >= 0).float()

    def quant_weight(self) -> torch.Tensor:
        """The weight the layer multiplies with (fake-quantized; same shape and dtype as `weight`)."""
        w = self.weight
        if not (self.quant_enabled and self.quantizes_weight) or self.weight_on_grid:
            return w
        if self.weight_format == "nf4":
            return quant.fake_quant_nf4(w)
        if self.round_logits is not None:                                           # learned rounding (AdaRound)
            wg, s, z = self._grid()
            qmin, qmax = quant.qrange(self.w_bits, self.w_symmetric)
            h = self.rounding_offsets().reshape(wg.shape)
            q = torch.clamp(torch.floor(wg / s) + h + z, qmin, qmax)
            return quant.dequantize(q, s, z).reshape(w.shape).to(w.dtype)
        return quant.fake_quant_weight(w, self.w_bits, self.group_size, self.w_symmetric,
                                       self.w_scale, self.w_zero_point)

    # ------------------------------------------------------------------------------------------ activations
    def prepare_input(self, x: torch.Tensor, rotate=None) -> torch.Tensor:
        """The tensor the weight multiplies before quantization: x rotated online (input_transform), then divided
        by the smoothing input_scale. Methods that collect a layer's inputs (GPTQ's Hessian, AWQ's clip search)
        apply this to what a forward pre-hook sees. `rotate` replaces the torch rotation (the layer-local check of
        a packed model passes the packed layer's own, whose fp32 sums run in another order)."""
        x = rotate(x) if rotate is not None and self.input_transform else rotate_input(x, self.input_transform)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)         # smoothing; the weight was multiplied by input_scale
        return x

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the (already smoothed) input activation x (..., in_features) with the shared quantizer."""
        if not self.quant_enabled:
            return x
        return self.act(x)

    @property
    def needs_act_calibration(self) -> bool:
        """Static per-tensor activations whose range has not been calibrated yet."""
        return self.act.needs_calibration

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, rotate=None) -> torch.Tensor:
        return F.linear(self.quant_input(self.prepare_input(x, rotate)), self.quant_weight(), self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Bake the final (hard-rounded) quantized weight into `weight` and turn learned tensors into buffers."""
        self.round_mode, self.quant_enabled = "hard", True
        if self.quantizes_weight and not self.weight_on_grid:
            self.weight.data = self.quant_weight().detach()
        self.weight_on_grid = True
        self.set_tensor("round_logits", None)
        self.act.freeze()

    # -------------------------------------------------------------------------------------------- save/load
    @torch.no_grad()
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """What a frozen layer needs on disk: integer weight codes (int grid) or FP weights, plus its qparams."""
        assert self.weight_on_grid, "freeze() the layer before exporting it"
        out = {}
        if self.weight_format == "int" and self.quantizes_weight:
            out["qweight"], out["w_scale"], out["w_zero_point"] = quant.quantize_weight(      # int8 / uint8 codes
                self.weight.float(), self.w_bits, self.group_size, self.w_symmetric, self.w_scale, self.w_zero_point)
        else:
            out["weight"] = self.weight.data
        if self.bias is not None:
            out["bias"] = self.bias.data
        for name in _OPTIONAL + ACT_TENSORS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {k: v.detach().clone().contiguous() for k, v in out.items()}   # clone: shared act tensors

    @torch.no_grad()
    def import_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of export_tensors (the layer is left frozen)."""
        dtype = self.weight.dtype
        if "qweight" in tensors:
            self.w_scale = tensors["w_scale"].float().to(self.weight.device)
            self.w_zero_point = tensors["w_zero_point"].float().to(self.weight.device)
            w = quant.dequantize_weight(tensors["qweight"].to(self.w_scale.device), self.w_scale, self.w_zero_point)
            self.weight.data = w.to(dtype)
        else:
            self.weight.data = tensors["weight"].to(self.weight.device, dtype)
        if self.bias is not None:
            self.bias.data = tensors["bias"].to(self.bias.device, dtype)
        for name in _OPTIONAL + ACT_TENSORS:
            if name in tensors:
                self.set_tensor(name, tensors[name].to(self.weight.device))
        self.weight_on_grid = True


# -------------------------------------------------------------------------------------------------- swapping
def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantize_module(module: nn.Module, qcfg: QuantConfig, prefix: str = "") -> list[str]:
    """Replace every nn.Linear inside `module` (a block) by a QuantLinear; returns the swapped names."""
    swapped = []
    for name, m in list(module.named_modules()):
        if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear):
            set_module(module, name, QuantLinear.from_linear(m, qcfg))
            swapped.append(f"{prefix}{name}")
    return swapped


def check_model(model: nn.Module, qcfg: QuantConfig) -> None:
    """Fail fast (QVLMError) if qcfg cannot apply to the model, e.g. a group size that does not divide a width."""
    for info in llava.linear_layers(model, qcfg.scope):
        m = info.module
        in_f = m.in_features
        if qcfg.group_size and in_f % qcfg.group_size:
            raise QVLMError(f"group_size={qcfg.group_size} does not divide the input width {in_f} of {info.key}",
                            "use 0 (per channel) or a group size that divides every quantized layer's width")


def quantize_model(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Swap every linear of the scoped blocks for a QuantLinear (RTN step sizes; not frozen). In place."""
    check_model(model, qcfg)
    for blk in llava.blocks(model, qcfg.scope):
        quantize_module(blk.module, qcfg)
    return model


def rotated_linears(model: nn.Module) -> list[str]:
    """Names of the FP (not quantized) linears that rotate their input online (RotatedInputLinear): a checkpoint
    records them, since a model rebuilt from its config has plain nn.Linear there."""
    return [n for n, m in model.named_modules() if isinstance(m, RotatedInputLinear)]


def restore_rotated_linears(model: nn.Module, names: list[str]) -> None:
    """Swap the named plain nn.Linear modules for RotatedInputLinear (inverse of `rotated_linears` at load)."""
    for name in names:
        set_module(model, name, RotatedInputLinear.from_linear(model.get_submodule(name)))


def quant_linears(module: nn.Module) -> list[tuple[str, QuantLinear]]:
    """(name, QuantLinear) pairs inside `module`, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QuantLinear)]


def share_act_quantizer(qlinears: list[QuantLinear]) -> ActQuantizer:
    """Make the linears that read one input tensor use ONE activation quantizer (the first one's); returns it."""
    first = qlinears[0].act
    for m in qlinears[1:]:
        if (m.a_bits, m.a_symmetric, m.a_granularity) != (first.a_bits, first.a_symmetric, first.a_granularity):
            raise QVLMError("linears reading one tensor have different activation settings",
                            "quantize them with one QuantConfig")
        m.act = first
    return first


def act_quantizers(module: nn.Module) -> list[ActQuantizer]:
    """The distinct ActQuantizer objects inside `module` (shared ones once), in module order."""
    seen, out = set(), []
    for _, m in quant_linears(module):
        if id(m.act) not in seen:
            seen.add(id(m.act))
            out.append(m.act)
    return out


def freeze_model(model: nn.Module) -> nn.Module:
    """freeze() every QuantLinear (bake the quantized weights)."""
    for _, m in quant_linears(model):
        m.freeze()
    return model
