"""Deployment: turn a fake-quantized model into a kernel-backed packed model, save / load it, and measure it.

Q-VLM (Wang et al., NeurIPS 2024) reports accuracy with simulated (fake) quantization; its memory claim needs the
weights stored as integers. This module takes a model quantized by any `qvlm.methods` method (every quantized
linear is a `qvlm.qlinear.QuantLinear`) and swaps each QuantLinear for a `DeployedLinear`, which is a
`kernels.PackedLinear` (int4 codes two per byte / int8 codes + fp32 scales, multiplied by the Triton GEMMs):

    model = deploy(model)                       # in place; QuantLinear -> DeployedLinear (a kernels.PackedLinear)
    save_packed(model, "runs/w4a4-packed", processor=processor)    # packed.safetensors + qvlm_packed.json + base/
    model, processor = load_packed("runs/w4a4-packed")              # or qvlm.models.load("runs/w4a4-packed")
    memory_report(model, "runs/w4a4-packed")    # bytes of linear weights / rest vs FP16, in memory and on disk
    qvlm deploy runs/w4a4 --out runs/w4a4-packed --json mem.json    # the same from a `qvlm quantize` directory

Equivalence with the fake-quant model (the contract, tested in tests/unit/test_deploy.py):
  weights      the codes packed are the ones the QuantLinear multiplies with: its `quant_weight()` (which applies
               learned AdaRound rounding when present, or is the frozen grid weight) re-quantized with the layer's
               own (possibly calibrated / clipped) w_scale and w_zero_point. Exact: (q - z) * s / s rounds back to q.
               `deploy` checks that the packed weight dequantizes to the fake-quant weight.
  activations  the default Q-VLM setting, dynamic per-token symmetric ranges, runs the `kernels.act_quant` kernel,
               which computes the same codes as `qvlm.quant` bit for bit (fp32 models). Two other quantizers a method
               can leave behind have no Triton kernel: a learned clipping ratio `a_clip` (BRECQ, Q-VLM with
               learn_act) and a static per-tensor step `a_scale` (a_granularity="tensor"). For those the activation
               CODES are computed in torch by `qvlm.quant` (the fake-quant reference itself), and the integer GEMM
               still runs in the Triton kernel; `deploy` records this in `model.qvlm_deploy["notes"]`.
  smoothing    a SmoothQuant / AWQ `input_scale` that could not be folded is kept as a buffer and divides the input
               before quantization, as in QuantLinear.forward (a GPU kernel would fuse it into act_quant).
  unsupported  asymmetric activations (the GEMMs have no activation zero point), NF4 weights, and bit-width pairs with
               no kernel (e.g. W8A16, W16A8) raise QVLMError naming the layer: we do not silently keep a fake-quant
               layer in a "packed" model. 16-bit layers (w_bits = a_bits = 16) become plain nn.Linear.
  numerics     integer accumulation is exact; the rescale order differs from F.linear, so outputs agree to fp32
               (or the activation dtype's) rounding, not bit for bit.

Backend: like PackedLinear, on CUDA the Triton kernels run; on CPU they run in Triton's interpreter only when
TRITON_INTERPRET=1 was set before `kernels` was first imported, else the plain-torch `*_ref` functions compute the
same integers. This module imports `kernels` lazily, so importing it (the CLI does) fixes nothing about that choice.

References: llm-awq `awq/entry.py` (`--q_backend real`, `real_quantize_model_weight`) and `qmodule.WQLinear`;
gpt-fast `quantize.py` (`model_int4.g32.pth` packed checkpoints); Hugging Face `save_pretrained` layout.
"""
from __future__ import annotations

import argparse
import functools
import json
import struct
import sys
import types
from pathlib import Path

import torch
from torch import nn

from . import quant
from .errors import QVLMError
from .paths import RESULTS_DIR
from .utils import atomic_dir, atomic_write_json

PACKED_META = "qvlm_packed.json"        # presence of this file marks a packed-model directory
PACKED_TENSORS = "packed.safetensors"
FORMAT_VERSION = 1
FP16_BYTES = 2
_ACT_TENSORS = ("input_scale", "a_scale", "a_zero_point", "a_clip")    # optional QuantLinear tensors we carry over


# ------------------------------------------------------------------------------------------- the deployed layer
@functools.cache
def _layer_class():
    """DeployedLinear, defined on first use so that importing qvlm.deploy does not import triton / kernels."""
    from kernels import (PackedLinear, act_quant, act_quant_ref, can_launch, pack_int4, w4a4_matmul, w4a4_ref,
                         w4a16_matmul, w4a16_ref, w8a8_matmul, w8a8_ref)
    from kernels.pack import PackedWeight

    class DeployedLinear(PackedLinear):
        """PackedLinear + what a Q-VLM QuantLinear may carry beyond it (see the module docstring):
        an optional smoothing `input_scale` and a non-default activation quantizer ("clip" | "static" |
        "tensor"), whose codes are computed in torch by qvlm.quant before the same integer GEMM kernels.
        Symmetric layers drop the all-zero `zero_point` buffer (`drop_zero_point`; the kernels never read it)."""

        def __init__(self, *args, act: str = "token", a_granularity: str = "token", **kwargs):
            super().__init__(*args, **kwargs)
            if act not in ACT_QUANTIZERS:
                raise QVLMError(f"unknown activation quantizer {act!r}", f"use one of {', '.join(ACT_QUANTIZERS)}")
            self.act, self.a_granularity = act, a_granularity
            for name in _ACT_TENSORS:
                self.register_buffer(name, None)

        def drop_zero_point(self) -> None:
            """Free the (N, G) all-zero zero_point of a symmetric layer (saves 4 bytes per group in memory and on disk)."""
            if self.symmetric:
                self.zero_point = None

        def packed_weight(self) -> PackedWeight:
            zp = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale)
            return PackedWeight(self.qweight, self.scale, zp, self.w_bits, self.group_size, self.symmetric,
                                self.container_bits, self.in_features)

        def act_codes(self, x2: torch.Tensor):
            """(M, K) activations -> int8 codes (M, K) and fp32 scale (M, 1), exactly as QuantLinear.quant_input."""
            if self.act == "static":                                 # calibrated per-tensor step (LSQ)
                scale, zp = self.a_scale.abs().clamp_min(1e-8), self.a_zero_point
            elif self.act == "clip":                                 # dynamic range shrunk by a learned ratio
                per_token = self.a_granularity == "token"
                lo = x2.amin(dim=-1, keepdim=True) if per_token else x2.min()
                hi = x2.amax(dim=-1, keepdim=True) if per_token else x2.max()
                clip = self.a_clip.clamp(0.05, 1.0)
                scale, zp = quant.qparams_from_minmax(lo.float() * clip, hi.float() * clip, self.a_bits, True)
            else:                                                    # "tensor": dynamic, one range per tensor
                scale, zp = quant.act_qparams(x2, self.a_bits, True, "tensor")
            scale = scale.to(x2.dtype)
            zp = torch.zeros_like(scale) if zp is None else zp.to(x2.dtype)
            q = quant.quantize(x2, scale, zp, self.a_bits, symmetric=True).to(torch.int8)      # (M, K)
            return q, scale.float().reshape(-1, 1).expand(x2.shape[0], 1).contiguous()         # (M, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """PackedLinear.forward's dispatch, plus input_scale, the torch activation quantizers and, in the
            interpreter, big tiles (INTERPRETER_BLOCK): the same kernels, same integers."""
            if self.input_scale is not None:
                x = x / self.input_scale.to(x.dtype)                 # smoothing (weight holds W * input_scale)
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features)                                    # (M, K)
            launch = can_launch(x2)
            block = INTERPRETER_BLOCK if launch and not x2.is_cuda else None        # None: autotune on CUDA
            zp = None if self.symmetric else self.zero_point
            if self.mode == "w4a16":
                y = (w4a16_matmul(x2, self.qweight, self.scale, zp, self.symmetric, block=block) if launch
                     else w4a16_ref(x2, self.qweight, self.scale, zp, self.symmetric))
            else:
                pack = self.mode == "w4a4"                                          # int4 codes two per byte
                if self.act != "token":                                             # clip / static / tensor
                    q, a_scale = self.act_codes(x2)
                    a = pack_int4(q, signed=True) if pack else q
                elif launch:
                    a, a_scale = act_quant(x2, self.a_bits, pack=pack,
                                           BLOCK_M=INTERPRETER_BLOCK["BLOCK_M"] if block else None)
                else:
                    a, a_scale = act_quant_ref(x2, self.a_bits, pack=pack)
                if pack:
                    y = (w4a4_matmul if launch else w4a4_ref)(a, a_scale, self.qweight, self.scale, zp,
                                                              self.symmetric, out_dtype=x.dtype,
                                                              **({"block": block} if launch else {}))
                else:
                    y = (w8a8_matmul if launch else w8a8_ref)(a, a_scale, self.qweight, self.scale, zp,
                                                              out_dtype=x.dtype, **({"block": block} if launch else {}))
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*lead, self.out_features)

        def spec(self) -> dict:
            """Constructor settings + which optional tensors exist (stored per layer in qvlm_packed.json)."""
            return dict(in_features=self.in_features, out_features=self.out_features, w_bits=self.w_bits,
                        a_bits=self.a_bits, group_size=self.group_size, symmetric=self.symmetric,
                        bias=self.bias is not None, act=self.act, a_granularity=self.a_granularity, mode=self.mode,
                        tensors=[n for n in _ACT_TENSORS if getattr(self, n) is not None])

        def extra_repr(self) -> str:
            extra = "".join(f", {n}" for n in _ACT_TENSORS if getattr(self, n) is not None)
            return super().extra_repr() + f", act={self.act}{extra}"

    return DeployedLinear


ACT_QUANTIZERS = ("token", "clip", "static", "tensor")    # token = dynamic per-token symmetric: the act_quant kernel
# Tiles for Triton's CPU interpreter, whose cost is per program and per op, not per element: 512 x 256 output tiles
# run a testbed layer ~20x faster than the GPU-sized defaults (kernels/*.DEFAULT_BLOCK). Ragged edges are still
# masked (M is rarely a multiple of 512). BLOCK_K stays each kernel's default, which it shrinks to divide the group
# size. On CUDA the kernels autotune and this is not used.
INTERPRETER_BLOCK = {"BLOCK_M": 512, "BLOCK_N": 256}


def __getattr__(name):               # qvlm.deploy.DeployedLinear, without importing kernels at module import
    if name == "DeployedLinear":
        return _layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_packed(m: nn.Module) -> bool:
    """True for a kernel-backed packed layer (kernels.PackedLinear or its DeployedLinear subclass)."""
    return type(m).__name__ in ("PackedLinear", "DeployedLinear") and hasattr(m, "qweight")


def packed_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, packed layer) pairs in module order."""
    return [(n, m) for n, m in model.named_modules() if is_packed(m)]


# ------------------------------------------------------------------------------------------------------ deploy
def activation_quantizer(ql) -> str:
    """Which activation quantizer a QuantLinear uses: 'token' (kernel), 'clip' | 'static' | 'tensor' (torch codes).
    Raises QVLMError for asymmetric activations (no kernel handles an activation zero point)."""
    if not ql.quantizes_act:
        return "token"                                               # unused (W4A16): no activation quantization
    if not ql.a_symmetric:
        raise QVLMError("asymmetric activations have no packed kernel (the integer GEMMs take no activation zero "
                        "point)", "re-quantize with symmetric activations (drop --a-asym)")
    if ql.a_granularity == "tensor" and ql.a_scale is not None:
        return "static"
    if ql.a_clip is not None:
        return "clip"
    return "token" if ql.a_granularity == "token" else "tensor"


def _problem(ql) -> str | None:
    """Why `deploy` cannot pack this QuantLinear, or None."""
    from kernels import mode_for

    if not (ql.quantizes_weight or ql.quantizes_act):
        return None                                                  # 16-bit layer: becomes a plain nn.Linear
    if ql.weight_format != "int":
        return (f"weight_format {ql.weight_format!r} has no packed kernel -- fix: quantize with weight_format='int' "
                f"(uniform integer grid)")
    try:
        activation_quantizer(ql)
        mode = mode_for(ql.w_bits, ql.a_bits)
    except QVLMError as e:
        return str(e)
    if mode != "w8a8" and ql.in_features % 2:
        return f"int4 packing needs an even input width, got {ql.in_features} -- fix: use w_bits 5..8 for this model"
    return None


def check_deployable(model: nn.Module) -> dict[str, str]:
    """{layer name: reason} for every QuantLinear that `deploy` cannot pack ({} = all deployable)."""
    from .qlinear import quant_linears

    return {name: why for name, ql in quant_linears(model) if (why := _problem(ql)) is not None}


def _fp_linear(ql) -> nn.Linear:
    """A 16-bit QuantLinear as the plain nn.Linear it equals (an unfoldable input_scale is folded back)."""
    lin = nn.Linear(ql.in_features, ql.out_features, ql.bias is not None, device="meta")
    w = ql.weight.detach()
    if ql.input_scale is not None:
        w = (w.float() / ql.input_scale.float()).to(w.dtype)        # weight held W * s for input x / s
    lin.weight = nn.Parameter(w, requires_grad=False)
    if ql.bias is not None:
        lin.bias = nn.Parameter(ql.bias.detach(), requires_grad=False)
    return lin


def pack_layer(ql) -> nn.Module:
    """One QuantLinear -> DeployedLinear holding the integer codes it actually uses (see the module docstring)."""
    cls = _layer_class()
    act = activation_quantizer(ql)
    w_fake = ql.quant_weight().detach()                              # (out, in): learned / frozen rounding applied
    src = types.SimpleNamespace(weight=w_fake, bias=ql.bias, in_features=ql.in_features, out_features=ql.out_features)
    layer = cls.from_float(src, ql.w_bits, ql.a_bits, ql.group_size, ql.w_symmetric,
                           scale=ql.w_scale.float(), zero_point=ql.w_zero_point.float())
    layer.act, layer.a_granularity = act, ql.a_granularity
    layer.drop_zero_point()
    keep = {"input_scale"} | ({"a_scale", "a_zero_point"} if act == "static" else set()) | \
           ({"a_clip"} if act == "clip" else set())
    for name in _ACT_TENSORS:
        t = getattr(ql, name)
        if name in keep and t is not None:
            layer.register_buffer(name, t.detach().clone())
    # the contract: the packed weight dequantizes to the fake-quant weight (a wrong code is off by >= 1 step)
    step = layer.scale.repeat_interleave(ql.in_features // layer.scale.shape[1], dim=1)          # (out, in)
    err = (layer.dequantized_weight() - w_fake.float()).abs()
    if not bool((err <= 0.01 * step).all()):
        raise QVLMError(f"packed weight differs from the fake-quant weight (max {float(err.max()):.3g})",
                        "the layer's w_scale / w_zero_point do not match its weight; re-run the quantization")
    return layer


def deploy(model: nn.Module) -> nn.Module:
    """Swap every QuantLinear for a kernel-backed DeployedLinear (a kernels.PackedLinear), IN PLACE; returns model.

    Checks every layer first and raises one QVLMError (naming the first offending layer) before changing anything.
    Records what it did in `model.qvlm_deploy` (layer counts per kernel / activation quantizer, notes)."""
    from .qlinear import _set_module, quant_linears

    qls = quant_linears(model)
    if not qls:
        raise QVLMError("the model has no QuantLinear layers (nothing to deploy)",
                        "quantize it first: qvlm.methods.quantize(...) or `qvlm quantize ... --out DIR`")
    problems = check_deployable(model)
    if problems:
        name, why = next(iter(problems.items()))
        raise QVLMError(f"cannot deploy {name} ({len(problems)} of {len(qls)} layers affected): {why}")
    modes, acts, fp = {}, {}, 0
    with torch.no_grad():
        for name, ql in qls:
            if not (ql.quantizes_weight or ql.quantizes_act):
                _set_module(model, name, _fp_linear(ql))
                fp += 1
                continue
            layer = pack_layer(ql)
            _set_module(model, name, layer)
            modes[layer.mode] = modes.get(layer.mode, 0) + 1
            if layer.mode != "w4a16":
                acts[layer.act] = acts.get(layer.act, 0) + 1
    model.qvlm_deploy = dict(modes=modes, activations=acts, fp_linears=fp, notes=deploy_notes(acts, fp))
    return model


def deploy_notes(acts: dict, fp: int = 0) -> list[str]:
    """Human-readable notes on the layers whose activation codes are not computed by the act_quant kernel."""
    what = {"clip": "a learned clipping ratio (a_clip)", "static": "a static per-tensor step (a_scale)",
            "tensor": "dynamic per-tensor ranges"}
    notes = [f"{n} layers use {what[a]}: their activation codes are computed in torch by qvlm.quant (no Triton "
             f"kernel for this quantizer); the integer GEMM still runs in the kernel" for a, n in acts.items() if a in what]
    if fp:
        notes.append(f"{fp} 16-bit layers stay plain nn.Linear (not quantized)")
    return notes


def backend(device: str = "cpu") -> str:
    """What runs a packed layer's forward on `device`: Triton on CUDA, the interpreter, or the torch references."""
    import kernels

    if str(device).startswith("cuda"):
        return "triton (cuda)"
    return "triton interpreter (TRITON_INTERPRET=1)" if kernels.INTERPRET else "torch reference (*_ref functions)"


# ------------------------------------------------------------------------------------------------- save / load
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
                a_granularity="token", mode=m.mode, tensors=[])


def _processor_for(model, processor):
    """The processor to store: the one given, else the one beside the checkpoint the model was loaded from."""
    if processor is not None:
        return processor
    ref = getattr(model, "name_or_path", "") or ""
    if ref and (Path(ref) / "config.json").is_file():
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(ref)
    raise QVLMError("no processor given and the model was not loaded from a checkpoint directory",
                    "pass processor= (the one returned by qvlm.models.load / build_random)")


def save_packed(model: nn.Module, out_dir, processor=None, source: dict | None = None) -> Path:
    """Write a packed-model directory atomically (nothing half-written on error):

        packed.safetensors   every tensor of the model: packed codes (uint8 / int8), fp32 scales, the FP rest
        qvlm_packed.json     format_version, scheme, per-layer specs, dtype, `source` (e.g. the quantized dir)
        base/                the LlavaConfig and the processor, so the directory is self-contained
    """
    from safetensors.torch import save_file

    from .models import llava

    pls = packed_linears(model)
    if not pls:
        raise QVLMError("the model has no packed layers", "call qvlm.deploy.deploy(model) first")
    processor = _processor_for(model, processor)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(format_version=FORMAT_VERSION, scheme=scheme(model), layers={n: layer_spec(m) for n, m in pls},
                dtype=str(llava.model_dtype(model)).replace("torch.", ""), source=source or {},
                notes=getattr(model, "qvlm_deploy", {}).get("notes", []))
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / PACKED_TENSORS))
        model.config.save_pretrained(tmp / "base")
        processor.save_pretrained(tmp / "base")
        (tmp / PACKED_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)


def read_packed_meta(path) -> dict:
    """The parsed qvlm_packed.json of a packed-model directory (QVLMError if absent / unreadable / wrong version)."""
    path = Path(path)
    if not path.is_dir():
        raise QVLMError(f"{path} not found (not a directory)", "pass a directory written by `qvlm deploy`")
    f = path / PACKED_META
    if not f.is_file():
        raise QVLMError(f"{path} is not a packed-model directory (no {PACKED_META})",
                        "create one with `qvlm deploy QUANTIZED_DIR --out DIR`")
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QVLMError(f"cannot read {f}: {type(e).__name__}", "re-run `qvlm deploy` to rewrite it") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise QVLMError(f"{path} has packed format {meta.get('format_version')!r}, expected {FORMAT_VERSION}",
                        "re-run `qvlm deploy` with this version of qvlm")
    return meta


def load_packed(path, device: str = "cpu", dtype: str = "") -> tuple[nn.Module, object]:
    """(model, processor) from a directory written by save_packed; packed layers are DeployedLinear. Eval mode.
    `dtype` ("" = as saved) casts the FP tensors; codes and scales keep their stored dtypes."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    from .qlinear import _set_module

    path = Path(path)
    meta = read_packed_meta(path)
    dtype = dtype or meta["dtype"]
    if dtype not in ("float32", "float16", "bfloat16"):
        raise QVLMError(f"unknown dtype {dtype!r}", "use float32, float16 or bfloat16")
    tdtype = getattr(torch, dtype)
    try:
        tensors = load_file(str(path / PACKED_TENSORS))
        config = LlavaConfig.from_pretrained(path / "base")
        processor = AutoProcessor.from_pretrained(path / "base")
    except (OSError, ValueError, RuntimeError) as e:
        raise QVLMError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                        "the directory is incomplete or corrupt; re-run `qvlm deploy`") from None
    with no_init_weights():                                           # every tensor is overwritten below
        model = LlavaForConditionalGeneration(config).to(tdtype).eval()
    cls = _layer_class()
    for name, s in meta["layers"].items():
        layer = cls(s["in_features"], s["out_features"], s["w_bits"], s["a_bits"], s["group_size"], s["symmetric"],
                    bias=s["bias"], dtype=tdtype, act=s["act"], a_granularity=s["a_granularity"])
        layer.drop_zero_point()
        for t in s["tensors"]:
            key = f"{name}.{t}"
            if key not in tensors:
                raise QVLMError(f"{path} lacks tensor {key}", "the directory is incomplete; re-run `qvlm deploy`")
            layer.register_buffer(t, tensors.pop(key))
        _set_module(model, name, layer)
    try:
        model.load_state_dict(tensors, strict=True)                   # copy_ casts FP tensors to `dtype`
    except RuntimeError as e:
        raise QVLMError(f"{path} does not match its config: {str(e).splitlines()[0][:160]}",
                        "the directory is incomplete or corrupt; re-run `qvlm deploy`") from None
    model.qvlm_deploy = dict(modes=meta["scheme"]["kernels"], activations=meta["scheme"]["activations"],
                             notes=meta.get("notes", []), source=meta.get("source", {}))
    return model.to(device).eval(), processor


# ------------------------------------------------------------------------------------------------------ memory
def linear_bytes(out_features: int, in_features: int, w_bits: int = 4, group_size: int = 0,
                 symmetric: bool = True) -> dict:
    """Bytes of one packed linear weight (codes + fp32 scales [+ zero points]) vs its FP16 weight, by formula."""
    container = 4 if w_bits <= 4 else 8
    n_groups = in_features // group_size if group_size else 1
    codes = out_features * in_features * container // 8
    qparams = out_features * n_groups * 4 * (1 if symmetric else 2)
    fp16 = out_features * in_features * FP16_BYTES
    return dict(codes=codes, qparams=qparams, bytes=codes + qparams, fp16_bytes=fp16, ratio=fp16 / (codes + qparams))


# (out_features, in_features, count) of every quantized linear of llava-1.5-7b (CLIP ViT-L/14-336 + projector +
# Vicuna-7B decoder), to state the W4 group-128 goal at the real widths (the testbed's widths are < 128 apart).
LLAVA_7B_LINEARS = [(1024, 1024, 4 * 24), (4096, 1024, 24), (1024, 4096, 24),          # vision tower, 24 layers
                    (4096, 1024, 1), (4096, 4096, 1),                                      # projector
                    (4096, 4096, 4 * 32), (11008, 4096, 2 * 32), (4096, 11008, 32)]       # LLM, 32 layers


def linear_bytes_total(shapes=LLAVA_7B_LINEARS, w_bits: int = 4, group_size: int = 128,
                       symmetric: bool = True) -> dict:
    """linear_bytes summed over [(out, in, count), ...] (default: llava-1.5-7b's quantized linears)."""
    tot = dict(codes=0, qparams=0, bytes=0, fp16_bytes=0)
    for out_f, in_f, n in shapes:
        b = linear_bytes(out_f, in_f, w_bits, group_size, symmetric)
        for k in tot:
            tot[k] += n * b[k]
    return dict(tot, ratio=tot["fp16_bytes"] / tot["bytes"])


CATEGORIES = ("linear codes", "linear scales / zero points", "activation quant params", "linear biases",
              "FP linears", "embeddings", "lm_head", "norms", "other")


def _categorise(model: nn.Module) -> dict[str, tuple[str, int]]:
    """{tensor name: (category, FP16 bytes of what it replaces)} for every parameter and buffer of the model."""
    out = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mname, mod in model.named_modules():
        own = list(mod.named_parameters(recurse=False)) + [(n, b) for n, b in mod.named_buffers(recurse=False)]
        for tname, t in own:
            key = f"{mname}.{tname}" if mname else tname
            fp16 = t.numel() * FP16_BYTES if t.is_floating_point() else t.numel() * t.element_size()
            if is_packed(mod):
                if tname == "qweight":
                    cat, fp16 = "linear codes", mod.out_features * mod.in_features * FP16_BYTES
                elif tname in ("scale", "zero_point"):
                    cat, fp16 = "linear scales / zero points", 0
                elif tname == "bias":
                    cat = "linear biases"
                else:
                    cat, fp16 = "activation quant params", 0
            elif mod is head:
                cat = "lm_head"
            elif isinstance(mod, nn.Embedding):
                cat = "embeddings"
            elif "Norm" in type(mod).__name__:
                cat = "norms"
            elif isinstance(mod, nn.Linear):
                cat = "FP linears"
            else:
                cat = "other"
            out[key] = (cat, fp16)
    return out


# Parameters of llava-1.5-7b that stay FP16 (not in LLAVA_7B_LINEARS): embed_tokens + lm_head (32000 x 4096 each),
# CLIP patch conv (1024 x 3 x 14 x 14), position (577 x 1024) and class (1024) embeddings, LayerNorms (2 per vision
# layer + pre / post, 2 x 1024 each), vision + projector biases, RMSNorms (65 x 4096).
LLAVA_7B_FP_PARAMS = (2 * 32000 * 4096 + 1024 * 3 * 14 * 14 + 577 * 1024 + 1024 + (2 * 24 + 2) * 2 * 1024
                      + 24 * (4 * 1024 + 4096 + 1024) + 4096 + 4096 + 65 * 4096)


def memory_summary(model: nn.Module, processor, w_bits: int = 4, group_sizes=(0,)) -> list[dict]:
    """Linear-weight bytes vs FP16 for W{w_bits} weights (weight-only RTN) at each group size, three ways:
    measured on a deployed copy of `model`; measured on one llava-width layer (4096 inputs, 1024 outputs) at
    group 0 and 128; and by formula (`linear_bytes_total`) for llava-1.5-7b, whose whole-model fraction adds its
    FP16 embeddings / lm_head / norms / biases (LLAVA_7B_FP_PARAMS)."""
    import copy

    from . import methods
    from .config import QuantConfig
    from .qlinear import QuantLinear

    a_bits = 16 if w_bits <= 4 else 8                                # W8 has no weight-only kernel: pair it with A8
    rows = []

    def row(weights, g, lin, model_fraction=None, model_fraction_fp16_rest=None):
        rows.append(dict(weights=weights, w_bits=w_bits, group_size=g, linear_bytes=lin["bytes"],
                         linear_fp16_bytes=lin["fp16_bytes"], ratio=round(lin["fp16_bytes"] / lin["bytes"], 3),
                         model_fraction=model_fraction, model_fraction_fp16_rest=model_fraction_fp16_rest))

    for g in group_sizes:
        qcfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, group_size=g)
        m, _ = methods.quantize(copy.deepcopy(model), processor, "rtn", qcfg, progress=False)
        rep = memory_report(deploy(m))
        row("this model (measured)", g, rep["linear"], round(rep["total"]["fraction"], 4),
            round(1 / rep["total"]["ratio_fp16_rest"], 4))
    for g in (0, 128):
        ql = QuantLinear.from_linear(nn.Linear(4096, 1024), QuantConfig(w_bits=w_bits, a_bits=a_bits, group_size=g))
        row("one 4096 -> 1024 linear (measured)", g, memory_report(deploy(nn.Sequential(ql)))["linear"])
    for g in (0, 128):
        f = linear_bytes_total(LLAVA_7B_LINEARS, w_bits, g)
        fp16_rest = LLAVA_7B_FP_PARAMS * FP16_BYTES
        row("llava-1.5-7b linears (formula)", g, f, round((f["bytes"] + fp16_rest) / (f["fp16_bytes"] + fp16_rest), 4),
            round((f["bytes"] + fp16_rest) / (f["fp16_bytes"] + fp16_rest), 4))
    return rows


def _safetensors_sizes(file: Path) -> dict[str, int]:
    """{tensor name: bytes on disk} from a safetensors header (8-byte length + JSON with data_offsets)."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def memory_report(model: nn.Module, packed_dir=None) -> dict:
    """Bytes per category (packed linear codes, their scales, the FP rest: embeddings, lm_head, norms, ...) in
    memory and, with `packed_dir`, on disk, each against the same model in FP16. Keys:

        rows     one dict per category: category, tensors, bytes, fp16_bytes, ratio (= fp16 / bytes), disk_bytes
        linear   the quantized linear weights (codes + scales / zero points) vs their FP16 weights
        total    the whole model; `bytes_fp16_rest` = packed linears + everything else cast to FP16
        disk     (with packed_dir) file sizes of the directory vs an FP16 safetensors estimate
    """
    cats = _categorise(model)
    seen, mem = set(), {}
    for key, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or key in seen or key not in cats:
            continue
        seen.add(key)
        mem[key] = t.numel() * t.element_size()
    disk = _safetensors_sizes(Path(packed_dir) / PACKED_TENSORS) if packed_dir else {}
    rows = []
    for c in CATEGORIES:
        keys = [k for k in mem if cats[k][0] == c]
        if not keys:
            continue
        b, f = sum(mem[k] for k in keys), sum(cats[k][1] for k in keys)
        row = dict(category=c, tensors=len(keys), bytes=b, fp16_bytes=f, ratio=round(f / b, 3) if b else None)
        if packed_dir:
            row["disk_bytes"] = sum(disk.get(k, 0) for k in keys)
        rows.append(row)
    by = {r["category"]: r for r in rows}
    lin_b = sum(by[c]["bytes"] for c in ("linear codes", "linear scales / zero points") if c in by)
    lin_f = sum(by[c]["fp16_bytes"] for c in ("linear codes", "linear scales / zero points") if c in by)
    tot_b, tot_f = sum(r["bytes"] for r in rows), sum(r["fp16_bytes"] for r in rows)
    packed_cats = ("linear codes", "linear scales / zero points", "activation quant params")
    rest_f = sum(r["fp16_bytes"] for r in rows if r["category"] not in packed_cats)
    rep = dict(rows=rows,
               linear=dict(bytes=lin_b, fp16_bytes=lin_f, ratio=lin_f / lin_b if lin_b else None,
                           fraction=lin_b / lin_f if lin_f else None),
               total=dict(bytes=tot_b, fp16_bytes=tot_f, ratio=tot_f / tot_b, fraction=tot_b / tot_f,
                          bytes_fp16_rest=tot_b - sum(r["bytes"] for r in rows if r["category"] not in packed_cats)
                          + rest_f))
    rep["total"]["ratio_fp16_rest"] = tot_f / rep["total"]["bytes_fp16_rest"]
    if packed_dir:
        files = sum(f.stat().st_size for f in Path(packed_dir).rglob("*") if f.is_file())
        fp16_disk = sum(cats[k][1] for k in disk if k in cats)
        rep["disk"] = dict(dir_bytes=files, tensor_file_bytes=(Path(packed_dir) / PACKED_TENSORS).stat().st_size,
                           fp16_tensor_bytes=fp16_disk, ratio=fp16_disk / sum(disk.values()))
    return rep


# -------------------------------------------------------------------------------------------- kernel checks
def kernel_checks(M: int = 37, N: int = 96, K: int = 256, group_size: int = 64, seed: int = 0,
                  device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """Each Triton kernel against its torch reference and against the fake-quant (qvlm.quant) fp32 result, on a
    ragged (M, N, K) problem. Rows: kernel, spec, max_abs_err vs fake-quant, tol (the kernels.testing bound; 0 =
    must be exact), ok, max_abs_err vs the torch *_ref. Needs CUDA or TRITON_INTERPRET=1 (QVLMError otherwise)."""
    import kernels as kn
    from kernels.testing import gemm_tolerance

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)                                # (M, K) activations
    w = torch.randn(N, K, generator=g).to(device)                                       # (N, K) weight
    if not kn.can_launch(x):
        raise QVLMError("cannot launch the Triton kernels here (no CUDA, TRITON_INTERPRET unset)",
                        "set TRITON_INTERPRET=1 before importing kernels (notebook 06: INTERPRET=True)")
    rows = []

    def add(kernel, spec, got, fake, ref, tol):
        err = (got.double() - fake.double()).abs()
        tol_t = torch.as_tensor(tol, dtype=torch.float64, device=err.device)
        rows.append(dict(kernel=kernel, spec=spec, max_abs_err=float(err.max()), tol=float(tol_t.max()),
                         ok=bool((err <= tol_t).all()), max_abs_err_vs_ref=float((got.double() - ref.double()).abs().max())))

    codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8).to(device)
    packed = kn.pack_int4(codes, signed=True)
    add("unpack_int4", "pack_int4 inverse (codes)", kn.unpack_int4(packed, True), codes, kn.unpack_int4_ref(packed, True), 0)
    for a_bits, pack in ((8, False), (4, True)):
        q, s = kn.act_quant(x, a_bits, pack=pack)
        q_ref, s_ref = kn.act_quant_ref(x, a_bits, pack=pack)
        q_fake = quant.quantize_act(x, a_bits)[0]
        add(f"act_quant a{a_bits}", "qvlm.quant.quantize_act (codes)", kn.unpack_int4_ref(q, True) if pack else q,
            q_fake, kn.unpack_int4_ref(q_ref, True) if pack else q_ref, 0)
    w_hat4 = quant.fake_quant_weight(w, 4, group_size)                                  # (N, K) fp32
    pw4 = kn.pack_weight(w, 4, group_size)
    fake = x.float() @ w_hat4.T
    add("w4a16", "x @ fake_quant_weight(W).T", kn.w4a16_matmul(x, pw4.qweight, pw4.scale),
        fake, kn.w4a16_ref(x, pw4.qweight, pw4.scale), gemm_tolerance(fake, x.float(), w_hat4, dtype, dtype))
    for a_bits, w_bits, name in ((8, 8, "w8a8"), (4, 4, "w4a4")):
        pw = kn.pack_weight(w, w_bits, group_size)
        w_hat = quant.fake_quant_weight(w, w_bits, group_size)
        x_hat = quant.fake_quant_act(x.float(), a_bits)
        fake = x_hat @ w_hat.T
        tol = gemm_tolerance(fake, x_hat, w_hat, dtype)
        if name == "w8a8":
            a, s = kn.act_quant(x, 8)
            got = kn.w8a8_matmul(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            ref = kn.w8a8_ref(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            acc, acc_ref = kn.w8a8_int32(a, pw.qweight), kn.w8a8_int32_ref(a, pw.qweight)
        else:
            a, s = kn.act_quant(x, 4, pack=True)
            got = kn.w4a4_matmul(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            ref = kn.w4a4_ref(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            acc, acc_ref = kn.w4a4_int32(a, pw.qweight), kn.w4a4_int32_ref(a, pw.qweight)
        add(name, "fake_quant_act(x) @ fake_quant_weight(W).T", got, fake, ref, tol)
        q_a = quant.quantize_act(x.float(), a_bits)[0].double()
        q_w = quant.quantize_weight(w, w_bits, group_size)[0].double()
        add(f"{name} int32", "quantize_act(x) @ quantize_weight(W).T (integers)", acc, q_a @ q_w.T, acc_ref, 0)
    return rows


def integer_accumulator(fake_layer, packed_layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel int32 accumulator, fake-quant integer matmul) of one layer for input x (M, K); equal exactly when
    deploy kept the layer's codes. Integer (w8a8 / w4a4) layers with the act_quant kernel and symmetric weights."""
    import kernels as kn

    if packed_layer.mode == "w4a16" or packed_layer.act != "token" or not packed_layer.symmetric:
        raise QVLMError(f"integer_accumulator needs a symmetric integer layer with per-token activations, got "
                        f"{packed_layer.mode} / {packed_layer.act}", "pick a w8a8 or w4a4 layer")
    x = x.reshape(-1, fake_layer.in_features)
    if fake_layer.input_scale is not None:
        x = x / fake_layer.input_scale.to(x.dtype)
    pack = packed_layer.mode == "w4a4"
    if kn.can_launch(x):
        block = INTERPRETER_BLOCK if not x.is_cuda else None
        a, _ = kn.act_quant(x, packed_layer.a_bits, pack=pack, BLOCK_M=block["BLOCK_M"] if block else None)
        acc = (kn.w4a4_int32(a, packed_layer.qweight, True, block=block) if pack
               else kn.w8a8_int32(a, packed_layer.qweight, block=block))
    else:
        a, _ = kn.act_quant_ref(x, packed_layer.a_bits, pack=pack)
        acc = kn.w4a4_int32_ref(a, packed_layer.qweight, True) if pack else kn.w8a8_int32_ref(a, packed_layer.qweight)
    q_a = quant.quantize_act(x.float(), fake_layer.a_bits)[0].double()                       # (M, K)
    q_w = quant.quantize_weight(fake_layer.quant_weight().float(), fake_layer.w_bits, fake_layer.group_size,
                                True, fake_layer.w_scale, fake_layer.w_zero_point)[0].double()  # (N, K)
    return acc, (q_a @ q_w.T).round().to(torch.int32)


def gpu_bench_results(directory=None) -> list[dict]:
    """Stored `bench.kernels` GPU runs ({"meta": {device, date, ...}, "rows": [...]}), newest first; [] if none."""
    d = Path(directory) if directory else RESULTS_DIR / "gpu"
    runs = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    runs = [r for r in runs if isinstance(r, dict) and "meta" in r and "rows" in r]
    return sorted(runs, key=lambda r: r["meta"].get("date", ""), reverse=True)


# ------------------------------------------------------------------------------------ fake-quant vs packed
# Samples run through the kernel-backed model per mode when the kernels run in the CPU interpreter (its cost is
# ~10 s per 16 testbed samples per scheme); on CUDA, or with the torch references, `n_eval` of the run is used.
INTERPRETER_EVAL = {"smoke": 16, "full": 64}


def packed_eval_size(mode: str, n_eval: int, device: str = "cpu") -> int:
    """How many test samples notebook 06 runs through the packed model (0 = the whole split)."""
    import kernels

    if not str(device).startswith("cuda") and kernels.INTERPRET:
        return INTERPRETER_EVAL[mode] if n_eval == 0 else min(n_eval, INTERPRETER_EVAL[mode])
    return n_eval


def largest_group_size(model: nn.Module, cap: int = 128, scope=None) -> int:
    """The largest even group size <= cap that divides the input width of every quantizable linear (0 if none)."""
    import math

    from .config import SCOPES
    from .models import llava

    widths = {info.module.in_features for info in llava.linear_layers(model, scope or SCOPES)}
    g = functools.reduce(math.gcd, widths)
    return max((d for d in range(2, min(g, cap) + 1, 2) if g % d == 0), default=0)


def quantize_and_deploy(model: nn.Module, processor, samples: list[dict], qcfg, method: str = "rtn",
                        calib_cfg=None, batch_size: int = 16, probe: str = "") -> dict:
    """Quantize a COPY of `model` with `method`, predict `samples` with the fake-quant model, deploy it, predict
    again with the packed model. Returns scheme, fake_acc, packed_acc, agreement (share of identical predictions),
    seconds of each pass, `predictions` (fake, packed), `layer_check` (layerwise_check), `model` (the packed model) and `probe` = (QuantLinear, its input) for the layer named
    `probe` (default: the first LLM linear), to check its integer accumulator with `integer_accumulator`."""
    import copy
    import time

    from . import evaluate, methods
    from .qlinear import quant_linears

    qmodel, _ = methods.quantize(copy.deepcopy(model), processor, method, qcfg, calib_cfg, progress=False)
    qls = dict(quant_linears(qmodel))
    probe = probe or next((n for n in qls if "language_model" in n), next(iter(qls)))
    seen, local = {}, {}

    def keep(name):   # first call only: the probe's whole input; for every layer LOCAL_ROWS rows of (input, output)
        def hook(m, a, y):
            if name == probe:
                seen.setdefault("x", a[0].detach())
            if name not in local:
                x2 = a[0].detach().reshape(-1, a[0].shape[-1])[:LOCAL_ROWS].clone()
                local[name] = (x2, y.detach().reshape(-1, y.shape[-1])[:LOCAL_ROWS].clone())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in qls.items()]
    t0 = time.perf_counter()
    fake = evaluate.predict(qmodel, processor, samples, batch_size, progress=False)
    t1 = time.perf_counter()
    for h in hooks:
        h.remove()
    deploy(qmodel)
    t2 = time.perf_counter()
    packed = evaluate.predict(qmodel, processor, samples, batch_size, progress=False)
    t3 = time.perf_counter()
    acc = lambda preds: sum(p == s["answer"] for p, s in zip(preds, samples)) / len(samples)  # noqa: E731
    return dict(scheme=scheme(qmodel)["name"], method=method, n=len(samples), fake_acc=acc(fake),
                packed_acc=acc(packed), agreement=sum(a == b for a, b in zip(fake, packed)) / len(samples),
                fake_seconds=t1 - t0, packed_seconds=t3 - t2, model=qmodel, probe=(probe, qls[probe], seen["x"]),
                layer_check=layerwise_check(qmodel, local), predictions=(fake, packed))


LAYER_RTOL = {torch.float32: 1e-4}   # layer-local check: fp32 roundoff over K ~ 1e-7..1e-5 relative
LAYER_RTOL_HALF = 2e-2               # fp16 / bf16 outputs: one output rounding (~1e-3) plus accumulation order


def layer_rtol(dtype) -> float:
    """Tolerance of `layerwise_check`'s max_rel_err for a model computing in `dtype`."""
    return LAYER_RTOL.get(dtype, LAYER_RTOL_HALF)


LOCAL_ROWS = 64     # rows (tokens) of each layer's input kept for the layer-local check: bounded memory at 7B/13B


def layerwise_check(packed_model: nn.Module, local: dict) -> dict:
    """Every packed layer fed the exact input its fake-quant twin saw: max |y_packed - y_fake| / max |y_fake| over
    layers. This is the deterministic contract (same codes, same integers, fp roundoff only). End-to-end
    predictions are NOT bit-identical: a ~1e-6 roundoff difference can move a value across a 4-bit rounding
    boundary in a later layer, and that one-step flip propagates (see notebook 06, section 3)."""
    worst, worst_name = 0.0, ""
    with torch.no_grad():
        for name, (x, y) in local.items():
            got = packed_model.get_submodule(name)(x)
            err = float((got.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
            if err >= worst:
                worst, worst_name = err, name
    return dict(n_layers=len(local), max_rel_err=worst, worst_layer=worst_name)


# --------------------------------------------------------------------------------------------------------- CLI
def _deploy_cmd(args) -> int:
    from .qlinear import QUANT_META, load_quantized, read_meta

    src, out = Path(args.dir), Path(args.out)
    if not src.is_dir():
        raise QVLMError(f"{args.dir} not found (not a directory)", "pass a directory written by `qvlm quantize --out`")
    if (src / PACKED_META).is_file():
        raise QVLMError(f"{args.dir} is already a packed model", "pass the `qvlm quantize` directory it came from")
    if not (src / QUANT_META).is_file():
        raise QVLMError(f"{args.dir} is not a quantized-model directory (no {QUANT_META})",
                        "create one with `qvlm quantize --model M --method rtn ... --out DIR`")
    if out.resolve() == src.resolve():
        raise QVLMError("--out is the input directory", "write the packed model to a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PACKED_META).is_file())):
        raise QVLMError(f"--out {args.out} exists and is not a packed-model directory",
                        "pick a new directory (an earlier `qvlm deploy` output is replaced)")
    qmeta = read_meta(src)
    model, processor = load_quantized(src, dtype=qmeta.get("dtype", "float32"))
    deploy(model)                                          # raises (nothing written) on an unsupported scheme
    source = dict(quantized_dir=str(src.resolve()), method=qmeta.get("method"), quant_config=qmeta.get("quant_config"),
                  base_model=qmeta.get("base_model"))
    save_packed(model, out, processor=processor, source=source)
    rep = memory_report(model, out)
    sch = scheme(model)
    lin, tot = rep["linear"], rep["total"]
    print(f"packed {sch['layers']} linears ({sch['name']}; kernels {sch['kernels']}) -> {out}")
    print(f"  linear weights {lin['bytes'] / 2**20:.2f} MiB = {lin['fraction']:.3f}x FP16 ({lin['ratio']:.2f}x smaller);"
          f" whole model {tot['bytes'] / 2**20:.2f} MiB = {tot['fraction']:.3f}x FP16; on disk "
          f"{rep['disk']['dir_bytes'] / 2**20:.2f} MiB")
    for note in model.qvlm_deploy["notes"]:
        print(f"  note: {note}")
    if args.json:
        atomic_write_json(args.json, dict(out=str(out), scheme=sch, memory=rep, notes=model.qvlm_deploy["notes"],
                                          source=source))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `qvlm deploy` (called by qvlm.cli.build_parser)."""
    p = subparsers.add_parser("deploy", help="pack a `qvlm quantize` directory for the Triton kernels")
    p.add_argument("dir", help="a directory written by `qvlm quantize --out DIR`")
    p.add_argument("--out", required=True, help="directory for the packed model (written atomically)")
    p.add_argument("--json", default="", help="write the scheme and memory report as JSON to this path")
    p.set_defaults(func=_deploy_cmd)
    return p


if __name__ == "__main__":
    from .cli import main
    sys.exit(main(["deploy", *sys.argv[1:]]))
