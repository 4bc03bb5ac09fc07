"""Deployment step 3: export a quantized model as a compressed-tensors checkpoint that other tools load.

    summary = export_compressed_tensors(model, "runs/w4-ct", processor=processor)   # from a fake-quant model
    model, processor = load_export("runs/w4-ct")        # transformers' from_pretrained + compressed-tensors
    qvlm export runs/gptq-w4 --format compressed-tensors --out runs/gptq-w4-ct

compressed-tensors (the format of llm-compressor, read by transformers' `from_pretrained` and by vLLM) stores
each quantized linear's integer codes and step sizes beside a `quantization_config` in config.json. What maps:

    ours (QuantLinear)                                compressed-tensors
    W{2..8}A16 symmetric, per channel or group g      "pack-quantized": weight_packed (int32, codes packed densely),
                                                      weight_scale (out, 1 | in/g)
    W8A8, dynamic per-token symmetric activations     "int-quantized": weight (int8 codes) + weight_scale (+
                                                      weight_zero_point for asymmetric weights), input
                                                      activations {strategy: token, dynamic: true}
    W8A8, static per-tensor symmetric step (a_scale)  "int-quantized" + input_scale, {strategy: tensor, dynamic: false}
    W8A8, dynamic per-tensor ranges                   "int-quantized", {strategy: tensor, dynamic: true}

Exactness. The weight codes are the ones the QuantLinear multiplies with (`quant_weight()`: learned AdaRound /
GPTQ rounding included), written with the layer's own scale and zero point; compressed-tensors stores signed codes,
so an asymmetric zero point z in [0, 2^b - 1] is written as z - 2^(b-1) (the codes shift with it; (q - z) is
unchanged). Its dequantization is (q - z) * s like `qvlm.core.quant.dequantize`, so a reloaded fp32 model's weights
equal our fake-quant weights bit for bit (checked here after writing, and in tests/unit/test_export.py). Static
activation steps are exact too. Dynamic activations are not: compressed-tensors divides a token's absmax by
(qmax - qmin) / 2 = 127.5 where we divide by qmax = 127, so its int8 activation codes are ~0.4 % coarser; the
accuracy of the reload is measured, not assumed (notebook 06, test_export).

No compressed-tensors equivalent (one-line error naming the setting and the closest exportable one): int4/int6
activations (W4A4, W4A8, W6A6: no integer activation format below 8 bits that transformers or vLLM run; W4A4 needs
our `kernels.w4a4`), asymmetric activations, asymmetric pack-quantized weights (compressed-tensors 0.20.1 writes
their zero points packed, transformers 5.24 allocates them unpacked and refuses the reload), learned activation clip ratios (`a_clip`: BRECQ / Q-VLM with
learn_act), unfolded smoothing scales (`input_scale`), online rotations (`--transform rotate`: compressed-tensors'
own transform configs use their own Hadamard construction, not ours), NF4 weights. A serving engine would need, for
those: an int4 x int4 (or int4 -> int8) GEMM with per-token activation quantization, a per-token clip ratio in the
activation quantizer, a per-channel input scale, and an online Walsh-Hadamard before the down_proj GEMM -- the
four things `kernels/` implements.

Writes are atomic (nothing half-written); `qvlm_export.json` records the source, the schemes and the sha256 of
every file, so `load_export` rejects a corrupt or truncated export with one line.

References: compressed-tensors `ModelCompressor` (compress_model / update_config) and `QuantizationScheme`;
llm-compressor's `save_pretrained` wrapper (the same four steps); transformers `CompressedTensorsHfQuantizer`.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
from compressed_tensors import __version__ as CT_VERSION
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             QuantizationStatus, apply_quantization_config)
from safetensors import SafetensorError
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration, PreTrainedModel

from ..core.qlinear import quant_linears, rotated_linears, set_module
from ..errors import QVLMError
from ..utils import atomic_dir, atomic_write_json, sha256
from .pack import fp_linear

FORMATS = ("compressed-tensors",)
EXPORT_META = "qvlm_export.json"      # marks an export directory (provenance, schemes, checksums)
EXPORT_VERSION = 1


def _closest(ql) -> str:
    """The nearest setting compressed-tensors can hold, for an error message."""
    g = f"G{ql.group_size}" if ql.group_size else ""
    return "W8A8" if ql.w_bits >= 6 else f"W{ql.w_bits}A16{g}"


def layer_scheme(ql) -> dict:
    """How one QuantLinear maps onto compressed-tensors: {format, weights: QuantizationArgs kwargs,
    input_activations: kwargs | None}. One-line QVLMError for what has no equivalent (module docstring)."""
    setting = f"W{ql.w_bits}A{ql.a_bits}" + (f"G{ql.group_size}" if ql.group_size else "")
    no = lambda what, fix: QVLMError(f"{setting}: {what} has no compressed-tensors equivalent",  # noqa: E731
                                     f"{fix}; closest exportable setting: {_closest(ql)}")
    if ql.weight_format != "int":
        raise no(f"weight_format {ql.weight_format!r}", "quantize with weight_format='int'")
    if ql.input_transform is not None:
        raise no("an online input rotation (--transform rotate)", "export a model quantized without the rotation")
    if ql.input_scale is not None:
        raise no("an unfolded smoothing scale (input_scale)", "use --transform smooth (scales folded into the norms)")
    if not ql.quantizes_weight:
        raise no("quantized activations with FP weights", "quantize the weights too")
    weights = dict(num_bits=ql.w_bits, type="int", symmetric=bool(ql.w_symmetric),
                   strategy="group" if ql.group_size else "channel", group_size=ql.group_size or None)
    if not ql.quantizes_act:
        if not ql.w_symmetric:        # measured: transformers 5.24 allocates the zero point unpacked, then mismatches
            raise no("asymmetric pack-quantized weights (compressed-tensors 0.20.1 packs their zero points in a "
                     "layout transformers' loader does not allocate: size mismatch on reload)",
                     "re-quantize with symmetric weights (drop --w-asym)")
        return dict(format="pack-quantized", weights=weights, input_activations=None)
    if (ql.w_bits, ql.a_bits) != (8, 8):
        raise no(f"{ql.a_bits}-bit activations", "use 8-bit weights and activations, or 16-bit activations")
    if not ql.a_symmetric:
        raise no("asymmetric activations", "re-quantize with symmetric activations (drop --a-asym)")
    if ql.a_clip is not None:
        raise no("a learned activation clip ratio (a_clip)", "re-quantize with --learn-act false")
    if ql.a_granularity == "tensor" and ql.a_scale is not None:
        acts = dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    else:
        acts = dict(num_bits=8, type="int", symmetric=True, strategy=ql.a_granularity, dynamic=True)
    return dict(format="int-quantized", weights=weights, input_activations=acts)


def check_exportable(model: nn.Module) -> dict[str, str]:
    """{layer name: reason} for every layer that compressed-tensors cannot hold ({} = exportable)."""
    rotation = ("an online Hadamard rotation (--transform rotate) has no compressed-tensors equivalent -- fix: "
                "export a model quantized without the rotation")
    bad = {name: rotation for name in rotated_linears(model)}                 # FP layers that rotate their input
    for name, ql in quant_linears(model):
        if ql.weight.dtype != torch.float32:
            bad[name] = (f"weights are {ql.weight.dtype}: the export writes our fp32 step sizes exactly -- fix: "
                         f"quantize in float32 (--dtype float32)")
        elif not (ql.quantizes_weight or ql.quantizes_act):
            if ql.input_transform is not None:
                bad[name] = rotation
        else:
            try:
                layer_scheme(ql)
            except QVLMError as e:
                bad[name] = str(e)
    return bad


def _group_layers(qls) -> dict[str, tuple[dict, list[str]]]:
    """Quantized layers grouped by identical scheme: {group name: (scheme, [layer names])}."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for name, ql in qls:
        if not (ql.quantizes_weight or ql.quantizes_act):
            continue
        s = layer_scheme(ql)
        key = json.dumps(s, sort_keys=True)
        groups.setdefault(key, (s, []))[1].append(name)
    return {f"group_{i}": v for i, v in enumerate(groups.values())}


def _dense_copy(model: nn.Module, qls) -> nn.Module:
    """A copy of `model` with every QuantLinear replaced by an nn.Linear holding its fake-quant weight (16-bit ones
    by the FP linear they equal)."""
    dense = copy.deepcopy(model)
    for name, ql in qls:
        if not (ql.quantizes_weight or ql.quantizes_act):
            set_module(dense, name, fp_linear(ql))
            continue
        lin = nn.Linear(ql.in_features, ql.out_features, ql.bias is not None, device="meta")
        lin.weight = nn.Parameter(ql.quant_weight().detach().clone(), requires_grad=False)
        if ql.bias is not None:
            lin.bias = nn.Parameter(ql.bias.detach().clone(), requires_grad=False)
        set_module(dense, name, lin)
    return dense


def _fill_qparams(module: nn.Module, ql, scheme: dict) -> None:
    """Our step sizes into the parameters compressed-tensors initialized (zero points as signed codes)."""
    module.weight_scale.data.copy_(ql.w_scale.to(module.weight_scale.dtype))
    if hasattr(module, "weight_zero_point"):
        shift = 0 if ql.w_symmetric else 2 ** (ql.w_bits - 1)      # unsigned [0, 2^b - 1] -> signed grid
        module.weight_zero_point.data.copy_((ql.w_zero_point - shift).to(module.weight_zero_point.dtype))
    acts = scheme["input_activations"]
    if acts and not acts["dynamic"]:
        module.input_scale.data.copy_(ql.a_scale.detach().abs().clamp_min(1e-8).reshape(module.input_scale.shape)
                                      .to(module.input_scale.dtype))
        if hasattr(module, "input_zero_point"):
            module.input_zero_point.data.zero_()
    module.quantization_status = QuantizationStatus.FROZEN


def export_compressed_tensors(model: nn.Module, out, *, processor=None, source: dict | None = None) -> dict:
    """Write `model` (a fake-quant model: QuantLinear layers) to `out` as a compressed-tensors checkpoint that
    `LlavaForConditionalGeneration.from_pretrained(out)` loads. Checks every layer first (one QVLMError naming the
    first offending layer, nothing written), then that the written codes dequantize to our fake-quant weights bit
    for bit. Returns the summary also stored in qvlm_export.json."""
    qls = quant_linears(model)
    if not qls:
        raise QVLMError("the model has no QuantLinear layers (nothing to export)",
                        "quantize it first: `qvlm quantize ... --out DIR`, then `qvlm export DIR ...`")
    problems = check_exportable(model)
    if problems:
        name, why = next(iter(problems.items()))
        raise QVLMError(f"cannot export {name} ({len(problems)} layers affected): {why}")
    groups = _group_layers(qls)
    by_name = dict(qls)
    with torch.no_grad():
        dense = _dense_copy(model, qls)
        config = QuantizationConfig(ignore=[], config_groups={
            g: QuantizationScheme(targets=names, format=s["format"], weights=QuantizationArgs(**s["weights"]),
                                  input_activations=QuantizationArgs(**s["input_activations"])
                                  if s["input_activations"] else None)
            for g, (s, names) in groups.items()})
        apply_quantization_config(dense, config)
        modules = dict(dense.named_modules())
        for s, names in groups.values():
            for name in names:
                _fill_qparams(modules[name], by_name[name], s)
        compressor = ModelCompressor.from_pretrained_model(dense)
        compressor.compress_model(dense)
        with atomic_dir(out) as tmp:
            dense.save_pretrained(tmp)
            compressor.update_config(tmp)
            if processor is not None:
                processor.save_pretrained(tmp)
            summary = dict(format="compressed-tensors", version=EXPORT_VERSION, compressed_tensors=CT_VERSION,
                           groups={g: dict(scheme=s, layers=len(names)) for g, (s, names) in groups.items()},
                           fp_layers=[n for n, ql in qls if not (ql.quantizes_weight or ql.quantizes_act)],
                           source=source or {})
            reloaded = _from_pretrained(tmp)
            summary["weights_bit_exact"] = check_weights(reloaded, model)
            summary["files"] = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_json(tmp / EXPORT_META, summary)
    return summary


@contextlib.contextmanager
def _spare_loaded_compressed_linears():
    """transformers 5 runs every sub-model's `_init_weights` over every module after loading (loaded tensors are
    spared by its init guards). DINOv2's reads `module.weight`, which a compressed linear (weight_packed /
    weight_scale, no `weight`) lacks, so a DINOv2 tower's export cannot be reloaded. Inside the `with`, a linear
    without `weight` whose own tensors were all loaded is marked initialised instead; everything else is untouched."""
    orig = PreTrainedModel._initialize_weights

    def initialize(self, module, is_custom_code=False):
        own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
        if (isinstance(module, nn.Linear) and not hasattr(module, "weight") and own
                and all(getattr(t, "_is_hf_initialized", False) for t in own)):
            module._is_hf_initialized = True
            return
        orig(self, module, is_custom_code)

    PreTrainedModel._initialize_weights = initialize
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = orig


def _from_pretrained(path: Path) -> nn.Module:
    """transformers' own loader (compressed-tensors quantizer), weights decompressed now rather than on the first
    forward, eval mode; corrupt files -> one-line QVLMError."""
    try:
        with _spare_loaded_compressed_linears():
            model = LlavaForConditionalGeneration.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise QVLMError(f"cannot load the compressed-tensors export {path}: {first}",
                        "the export is corrupt or truncated; re-run `qvlm export`") from None
    if getattr(model, "ct_decompress_hook", None) is not None:   # decompress now, not lazily on the first forward
        model.hf_quantizer.compressor.decompress_model(model)
    return model.eval()


def check_weights(reloaded: nn.Module, model: nn.Module) -> bool:
    """Every quantized layer of the reloaded export holds exactly our fake-quant weight; QVLMError otherwise."""
    modules = dict(reloaded.named_modules())
    for name, ql in quant_linears(model):
        w = modules[name].weight.detach()
        ours = ql.quant_weight().detach()
        if w.shape != ours.shape or not torch.equal(w.to(ours.dtype), ours):
            diff = float((w.float() - ours.float()).abs().max()) if w.shape == ours.shape else float("nan")
            raise QVLMError(f"exported {name} does not reload to our fake-quant weight (max |diff| {diff:.3g})",
                            "this is a bug in qvlm.deploy.export: report it with the setting used")
    return True


def read_export_meta(path) -> dict:
    p = Path(path) / EXPORT_META
    if not p.is_file():
        raise QVLMError(f"{path} is not a compressed-tensors export (no {EXPORT_META})",
                        "create one with `qvlm export DIR --format compressed-tensors --out OUT`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise QVLMError(f"{p} is not valid JSON (truncated?)", "re-run `qvlm export`") from None


def load_export(path, device: str = "cpu"):
    """(model, processor) of a compressed-tensors export, after checking every file against its recorded sha256."""
    path = Path(path)
    meta = read_export_meta(path)
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise QVLMError(f"{path} is missing {name}", "the export is incomplete; re-run `qvlm export`")
        if sha256(f) != digest:
            raise QVLMError(f"{f} does not match its recorded checksum (corrupt or truncated)",
                            "re-run `qvlm export`")
    model = _from_pretrained(path).to(device)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise QVLMError(f"cannot load the processor from {path}: {type(e).__name__}",
                        "export with the processor (qvlm export does)") from None
    return model, processor
