"""Deployment step 1: turn a fake-quantized model into a kernel-backed packed model (`deploy`).

Q-VLM (Wang et al., NeurIPS 2024) reports accuracy with simulated (fake) quantization; its memory claim needs the
weights stored as integers. This module takes a model quantized by any `qvlm.methods` method (every quantized
linear is a `qvlm.core.qlinear.QuantLinear`) and swaps each QuantLinear for a `DeployedLinear`, which is a
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
  activations  the `kernels.act_quant` kernel computes the same codes as `qvlm.core.quant` bit for bit (fp32 models)
               for the three quantizers the methods leave behind on per-token layers: dynamic per-token symmetric
               ranges (the default), a learned clipping ratio `a_clip` (BRECQ, Q-VLM with learn_act) and a static
               symmetric per-tensor step `a_scale` (a_granularity="tensor", calibrated). Only dynamic per-tensor
               ranges (and a clip over them) need a reduction across all tokens before any code, so their CODES are
               computed in torch by `qvlm.core.quant`; the integer GEMM still runs in the Triton kernel, and `deploy`
               records this in `model.qvlm_deploy["notes"]`.
  rotation     a QuaRot online Hadamard (`input_transform="hadamard"`, down_proj after `--transform rotate`) runs the
               `kernels.hadamard` kernel (torch `fwht` on the reference path) before activation quantization.
  smoothing    a SmoothQuant / AWQ `input_scale` that could not be folded is kept as a buffer and divides the input
               before quantization, as in QuantLinear.forward (a GPU kernel would fuse it into act_quant).
  unsupported  asymmetric activations (the GEMMs have no activation zero point), NF4 weights, and bit-width pairs with
               no kernel (e.g. W8A16, W16A8) raise QVLMError naming the layer: we do not silently keep a fake-quant
               layer in a "packed" model. 16-bit layers (w_bits = a_bits = 16) become plain nn.Linear.
  numerics     integer accumulation is exact; the rescale order differs from F.linear, so outputs agree to fp32
               (or the activation dtype's) rounding, not bit for bit.

Backend: like PackedLinear, on CUDA the Triton kernels run; on CPU they run in Triton's interpreter only when
TRITON_INTERPRET=1 was set before `kernels` was first imported, else the plain-torch `*_ref` functions compute the
same integers. The rest of deployment: `qvlm.deploy.checkpoint` (save / load), `qvlm.deploy.memory` (bytes), `qvlm.deploy.verify`
(kernel checks, layer-local packed-vs-fake checks), `qvlm.deploy.cli` (`qvlm deploy`).

References: llm-awq `awq/entry.py` (`--q_backend real`, `real_quantize_model_weight`) and `qmodule.WQLinear`;
gpt-fast `quantize.py` (`model_int4.g32.pth` packed checkpoints); Hugging Face `save_pretrained` layout.
"""
from __future__ import annotations

import types

import torch
from torch import nn

import kernels
from kernels import mode_for

from ..core.qlinear import RotatedInputLinear, quant_linears, set_module
from ..errors import QVLMError
from .layer import ACT_TENSORS, DeployedLinear, packed_linears

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
    return {name: why for name, ql in quant_linears(model) if (why := _problem(ql)) is not None}


def fp_linear(ql) -> nn.Linear:
    """A 16-bit QuantLinear as the plain nn.Linear it equals (an unfoldable input_scale is folded back)."""
    cls = RotatedInputLinear if ql.input_transform == "hadamard" else nn.Linear      # keeps the online rotation
    lin = cls(ql.in_features, ql.out_features, ql.bias is not None, device="meta")
    w = ql.weight.detach()
    if ql.input_scale is not None:
        w = (w.float() / ql.input_scale.float()).to(w.dtype)        # weight held W * s for input x / s
    lin.weight = nn.Parameter(w, requires_grad=False)
    if ql.bias is not None:
        lin.bias = nn.Parameter(ql.bias.detach(), requires_grad=False)
    return lin


def pack_layer(ql) -> nn.Module:
    """One QuantLinear -> DeployedLinear holding the integer codes it actually uses (see the module docstring)."""
    act = activation_quantizer(ql)
    w_fake = ql.quant_weight().detach()                              # (out, in): learned / frozen rounding applied
    src = types.SimpleNamespace(weight=w_fake, bias=ql.bias, in_features=ql.in_features, out_features=ql.out_features)
    layer = DeployedLinear.from_float(src, ql.w_bits, ql.a_bits, ql.group_size, ql.w_symmetric,
                           scale=ql.w_scale.float(), zero_point=ql.w_zero_point.float())
    layer.act, layer.a_granularity, layer.input_transform = act, ql.a_granularity, ql.input_transform
    layer.drop_zero_point()
    keep = {"input_scale"} | ({"a_scale", "a_zero_point"} if act == "static" else set()) | \
           ({"a_clip"} if act == "clip" else set())
    for name in ACT_TENSORS:
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
    qls = quant_linears(model)
    if not qls:
        raise QVLMError("the model has no QuantLinear layers (nothing to deploy)",
                        "quantize it first: qvlm.methods.quantize(...) or `qvlm quantize ... --out DIR`")
    problems = check_deployable(model)
    if problems:
        name, why = next(iter(problems.items()))
        raise QVLMError(f"cannot deploy {name} ({len(problems)} of {len(qls)} layers affected): {why}")
    modes, acts, fp, torch_codes = {}, {}, 0, 0
    with torch.no_grad():
        for name, ql in qls:
            if not (ql.quantizes_weight or ql.quantizes_act):
                set_module(model, name, fp_linear(ql))
                fp += 1
                continue
            layer = pack_layer(ql)
            set_module(model, name, layer)
            modes[layer.mode] = modes.get(layer.mode, 0) + 1
            if layer.mode != "w4a16":
                acts[layer.act] = acts.get(layer.act, 0) + 1
                torch_codes += layer.kernel_act_args() is None
    model.qvlm_deploy = dict(modes=modes, activations=acts, fp_linears=fp, notes=deploy_notes(torch_codes, fp))
    return model


def deploy_notes(torch_codes: int, fp: int = 0) -> list[str]:
    """Human-readable notes on the layers whose activation codes the act_quant kernel does not compute."""
    notes = []
    if torch_codes:
        notes.append(f"{torch_codes} layers use dynamic per-tensor activation ranges: their codes are computed in "
                     f"torch by qvlm.core.quant (a reduction over all tokens first); the integer GEMM still runs in "
                     f"the kernel")
    if fp:
        notes.append(f"{fp} 16-bit layers stay plain nn.Linear (not quantized)")
    return notes


def backend(device: str = "cpu") -> str:
    """What runs a packed layer's forward on `device`: Triton on CUDA, the interpreter, or the torch references."""
    if str(device).startswith("cuda"):
        return "triton (cuda)"
    return "triton interpreter (TRITON_INTERPRET=1)" if kernels.INTERPRET else "torch reference (*_ref functions)"
