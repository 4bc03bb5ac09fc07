"""Activation entropy of the quantized input of every quantized linear layer (paper Sec. 3.2, Fig. 2; the proxy
H(x_q) = -sum p(x_q) log p(x_q) that precedes Eq. 4).

The paper correlates a layer's activation entropy with its DED (discretization error difference, Sec. 3.2) and
uses entropy as a cheap proxy for cross-layer dependency. We compute H exactly as the equation reads: the
probability is taken over the quantization LEVELS (the integer codes x_q), not over magnitudes.

    codes(x, bits, ...)          per-token (or per-tensor) integer codes, shifted to 0..K-1 (K = 2^bits)
    level_counts(c, bits)        histogram over the K levels
    entropy(counts)              plug-in (maximum-likelihood) or Miller-Madow estimate, in nats
    run_entropy(model, ...)      forward hooks on calibration data (TRAIN split) -> EntropyStats
    save_entropy / load_entropy  R10 artifact (the config is stored inside the file)

Per-token scales are handled explicitly: every token is quantized with ITS OWN step size (dynamic per-token
activation quantization, `qvlm.quant.act_qparams(..., "token")`), and the codes of all tokens are pooled into
one histogram. Image and text tokens are counted separately: for LLM layers a position is an image token iff
`input_ids == config.image_token_id`; vision-tower and projector layers see only image tokens; padding is ignored.

Differences from the official code (`QVLM:.../quant_modules.py::QuantAct.cal_entropy`, see docs §1.B3, §5.3):
that function L2-normalises |x_hat| over tokens and is not a probability; it grows with sequence length
(≈15 → 51 for T = 100 → 600). Ours is bounded by log K and independent of T.

References: Shannon entropy of a histogram; Miller (1955) bias correction; docs/qvlm-method.md §1.A.4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data as qdata
from .config import SCOPES, QuantConfig
from .errors import QVLMError
from .models import llava
from .quant import FP_BITS, act_qparams, check_bits, qrange, quantize
from .utils import load_artifact, save_artifact

ESTIMATORS = ("plugin", "miller_madow")
SPLITS = ("all", "image", "text")


# ------------------------------------------------------------------------------------------- estimators
def codes(x: torch.Tensor, bits: int, symmetric: bool = True, granularity: str = "token",
          scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Integer quantization codes of x, shifted to 0..2^bits-1 (long), same shape as x.

    granularity "token": each row of the last dim gets its own step size (dynamic per-token quantization);
    "tensor": one step for the whole tensor (or the given static `scale`/`zero_point`)."""
    check_bits(bits, "bits")
    if bits >= FP_BITS:
        raise QVLMError("entropy over quantization levels needs a bit-width in 2..8 (got 16 = not quantized)",
                        "pass bits=<2..8> to measure the entropy a quantizer of that width would see")
    x = x.float()
    if scale is None:
        scale, zero_point = act_qparams(x, bits, symmetric, granularity)
    q = quantize(x, scale, zero_point, bits, symmetric)          # (..., C) integers in [qmin, qmax]
    qmin, _ = qrange(bits, symmetric)
    return (q - qmin).long()                                     # (..., C) in 0..K-1


def level_counts(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Histogram (K,) float64 of codes in 0..K-1 over all elements of `c`."""
    k = 2 ** bits
    return torch.bincount(c.reshape(-1), minlength=k).double()


def entropy(counts: torch.Tensor, estimator: str = "plugin") -> float:
    """H = -sum_i p_i log p_i (nats) from a histogram. 'miller_madow' adds (m - 1) / (2N), m = occupied bins."""
    if estimator not in ESTIMATORS:
        raise QVLMError(f"unknown entropy estimator {estimator!r}", f"use one of {', '.join(ESTIMATORS)}")
    counts = counts.double().reshape(-1)
    n = counts.sum()
    if n <= 0:
        return float("nan")                                       # no tokens of this kind (e.g. text-only batch)
    p = counts[counts > 0] / n
    h = float(-(p * p.log()).sum())
    if estimator == "miller_madow":
        h += (int((counts > 0).sum()) - 1) / (2 * float(n))
    return max(h, 0.0)                                            # -0.0 for a one-hot histogram


def gaussian_code_entropy(scale: float, bits: int, symmetric: bool = True, sigma: float = 1.0,
                          zero_point: float = 0.0) -> float:
    """Closed-form reference: entropy (nats) of the codes of x ~ N(0, sigma^2) quantized with a fixed `scale`.

    P(q) = Phi(((q - z) + 1/2) s / sigma) - Phi(((q - z) - 1/2) s / sigma), with both tails lumped into the end
    levels (clamping). Used by the tests and notebook 01 as the numerical value to match."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.arange(qmin, qmax + 1, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(float(sigma)))
    hi = normal.cdf((q - zero_point + 0.5) * scale)
    lo = normal.cdf((q - zero_point - 0.5) * scale)
    hi[-1], lo[0] = 1.0, 0.0                                      # clamp: the tails land in qmin / qmax
    return entropy(hi - lo)


# ------------------------------------------------------------------------------------------- hook machinery
def token_masks(part: str, x: torch.Tensor, batch: dict, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, image) boolean masks over the rows of x (..., C) flattened to (N,).

    vision / projector inputs are image tokens only; LLM inputs are (B, T, C) aligned with input_ids, and
    padding (attention_mask == 0) is dropped."""
    n = x.reshape(-1, x.shape[-1]).shape[0]
    if part != "llm":
        ones = torch.ones(n, dtype=torch.bool)
        return ones, ones
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert x.shape[:-1] == ids.shape, f"LLM input {tuple(x.shape)} does not align with input_ids {tuple(ids.shape)}"
    return mask.bool().reshape(-1).cpu(), (ids == image_token_id).reshape(-1).cpu()


def image_token_id(model: nn.Module) -> int:
    """The image placeholder token id from the model config (never hard-coded)."""
    tid = getattr(model.config, "image_token_id", None)
    if tid is None:
        tid = getattr(model.config, "image_token_index", None)
    if tid is None:
        raise QVLMError("model config has no image_token_id", "use a llava-hf LlavaForConditionalGeneration checkpoint")
    return int(tid)


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The tensors of a collated batch the model's forward takes, on the model's device and dtype."""
    dev, dt = llava.model_device(model), llava.model_dtype(model)
    out = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask") if k in batch}
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"].to(dev, dt)
    return out


def check_train_split(samples: list[dict]) -> None:
    """Calibration statistics and optimisation use the TRAIN split only (QVLMError otherwise)."""
    if not samples:
        raise QVLMError("empty calibration set", "pass at least one calibration sample (train split)")
    bad = {s.get("split") for s in samples} - {"train"}
    if bad:
        raise QVLMError(f"calibration samples from split(s) {sorted(map(str, bad))}",
                        "draw calibration data with qvlm.data.calibration_set (train split only)")


def iterate_batches(processor, samples: list[dict], batch_size: int, with_answer: bool = False):
    """Collated calibration batches (images and text-only never mixed)."""
    if not samples:
        raise QVLMError("empty calibration set", "pass at least one calibration sample (train split)")
    for chunk in qdata.batches(samples, batch_size):
        yield qdata.collate(chunk, processor, with_answer=with_answer)


class InputTap:
    """Forward pre-hooks that hand each watched linear's input to `fn(site, x)` during a forward pass.

    Use as a context manager; hooks are removed on exit even if the forward raises."""

    def __init__(self, modules: dict[str, nn.Module], fn):
        self.modules, self.fn, self.handles = modules, fn, []

    def __enter__(self):
        for key, m in self.modules.items():
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, key=key: self.fn(key, args[0])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """Consecutive quantized linears that read the SAME input tensor (q/k/v; gate/up): one quantized input.

    They share one activation quantizer input, so they have one entropy and are never split by a partition."""
    index: int
    keys: list                # LinearInfo.key of each member, forward order
    part: str
    block: int
    width: int

    @property
    def name(self) -> str:
        return unit_name(self.keys)


def unit_name(keys: list[str]) -> str:
    """['llm.0.self_attn.q_proj', 'llm.0.self_attn.k_proj'] -> 'llm.0.q_proj+k_proj' (a unit's display name)."""
    part, block, _ = keys[0].split(".", 2)
    return f"{part}.{block}.{'+'.join(k.rsplit('.', 1)[-1] for k in keys)}"


def find_units(model: nn.Module, processor, sample: dict, scope=SCOPES) -> list[Unit]:
    """Group `linear_layers(model, scope)` into Units by tracing which linears receive the same input tensor
    object on one forward pass (data-driven: no layer names or widths are assumed)."""
    infos = llava.linear_layers(model, scope)
    seen: dict[str, torch.Tensor] = {}
    with InputTap({i.key: i.module for i in infos}, lambda k, x: seen.setdefault(k, x)), torch.no_grad():
        batch = qdata.collate([sample], processor)
        model(**model_inputs(model, batch))
    missing = [i.key for i in infos if i.key not in seen]
    if missing:
        raise QVLMError(f"{len(missing)} linear layers never ran on the probe sample (first: {missing[0]})",
                        "use a calibration sample with an image so the vision tower runs")
    units: list[Unit] = []
    for info in infos:
        last = units[-1] if units else None
        if last is not None and seen[info.key] is seen[last.keys[-1]]:
            last.keys.append(info.key)                            # same input tensor: same unit
        else:
            units.append(Unit(len(units), [info.key], info.part, info.block, info.module.in_features))
    return units


# ------------------------------------------------------------------------------------------- collection
@dataclass
class EntropyStats:
    """Per-linear level histograms (all / image / text tokens) of the quantized inputs + the config used."""
    config: dict                                  # bits, symmetric, granularity, n_calib, seed, model, scope ...
    keys: list                                    # LinearInfo keys, forward order
    parts: list
    units: list                                   # [[key, ...], ...] in forward order
    counts: dict = field(default_factory=dict)    # split -> (n_layers, K) float64 histograms

    def entropy(self, split: str = "all", estimator: str = "plugin") -> list[float]:
        """H(x_q) per linear layer (nats), forward order."""
        if split not in SPLITS:
            raise QVLMError(f"unknown token split {split!r}", f"use one of {', '.join(SPLITS)}")
        return [entropy(c, estimator) for c in self.counts[split]]

    def unit_entropy(self, split: str = "all", estimator: str = "plugin") -> list[float]:
        """H(x_q) per Unit (members share one input, so one value each)."""
        h = dict(zip(self.keys, self.entropy(split, estimator)))
        return [h[u[0]] for u in self.units]

    def table(self, estimator: str = "plugin") -> list[dict]:
        """One row per linear: key, part, H_all, H_image, H_text, n_codes (coded elements), log K (the maximum)."""
        cols = {s: self.entropy(s, estimator) for s in SPLITS}
        k = self.counts["all"].shape[1]
        return [dict(key=key, part=part, H_all=cols["all"][i], H_image=cols["image"][i], H_text=cols["text"][i],
                     n_codes=int(self.counts["all"][i].sum()), log_K=math.log(k))
                for i, (key, part) in enumerate(zip(self.keys, self.parts))]


def act_step(x: torch.Tensor, qcfg: QuantConfig, bits: int, module: nn.Module | None = None):
    """(scale, zero_point) of a linear's input under qcfg's activation quantizer: per-token dynamic, or per-tensor
    (the module's calibrated static step if it carries one as `a_scale`/`a_zero_point`, else the batch range)."""
    scale = getattr(module, "a_scale", None) if qcfg.a_granularity == "tensor" else None
    if scale is None:
        return act_qparams(x.float(), bits, qcfg.a_symmetric, qcfg.a_granularity)
    zp = getattr(module, "a_zero_point", None)
    return scale, torch.zeros_like(scale) if zp is None else zp


def act_codes(x: torch.Tensor, qcfg: QuantConfig, bits: int, module: nn.Module | None = None) -> torch.Tensor:
    """Codes (0..K-1) of a linear's input under qcfg's activation quantizer (see act_step)."""
    scale, zp = act_step(x, qcfg, bits, module)
    return codes(x, bits, qcfg.a_symmetric, qcfg.a_granularity, scale, zp)


@torch.no_grad()
def run_entropy(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig | None = None,
                bits: int = 0, batch_size: int = 16, scope=None, meta: dict | None = None) -> EntropyStats:
    """Histogram the quantized input codes of every quantized linear over calibration `samples` (TRAIN split).

    bits 0 = qcfg.a_bits. Works on an FP model (the codes a quantizer WOULD produce) or a quantized one."""
    check_train_split(samples)
    qcfg = qcfg or QuantConfig()
    bits = bits or qcfg.a_bits
    scope = tuple(scope or qcfg.scope)
    units = find_units(model, processor, samples[0], scope)
    infos = {i.key: i for i in llava.linear_layers(model, scope)}
    keys = [k for u in units for k in u.keys]
    row = {k: i for i, k in enumerate(keys)}
    k_levels = 2 ** check_bits(bits, "bits")
    counts = {s: torch.zeros(len(keys), k_levels, dtype=torch.float64) for s in SPLITS}
    img_id = image_token_id(model)
    state: dict = {}

    def on_input(key, x):
        info = infos[key]
        c = act_codes(x, qcfg, bits, info.module).reshape(-1, x.shape[-1]).cpu()   # (N, C) codes
        valid, image = token_masks(info.part, x, state["batch"], img_id)          # (N,), (N,)
        for split, m in (("all", valid), ("image", valid & image), ("text", valid & ~image)):
            counts[split][row[key]] += level_counts(c[m], bits)

    with InputTap({k: infos[k].module for k in keys}, on_input):
        for batch in iterate_batches(processor, samples, batch_size):
            state["batch"] = batch
            model(**model_inputs(model, batch))
    cfg = dict(bits=bits, a_symmetric=qcfg.a_symmetric, a_granularity=qcfg.a_granularity, scope=list(scope),
               n_calib=len(samples), **(meta or {}))
    return EntropyStats(cfg, keys, [infos[k].part for k in keys], [list(u.keys) for u in units], counts)


# ------------------------------------------------------------------------------------------- artifacts (R10)
def artifact_name(kind: str, model: str, bits: int, n_calib: int, seed: int, extra: str = "") -> str:
    """`{model}-a{bits}-n{N}-s{seed}[-extra]-{kind}.pt` (the full config is also stored inside the file)."""
    model = Path(model).name or "model"
    return f"{model}-a{bits}-n{n_calib}-s{seed}{'-' + extra if extra else ''}-{kind}.pt"


def save_entropy(stats: EntropyStats, path) -> Path:
    """Write `stats` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("entropy", stats, path)


def load_entropy(path) -> EntropyStats:
    """Inverse of save_entropy."""
    return load_artifact("entropy", EntropyStats, path, "qvlm.entropy.save_entropy")
