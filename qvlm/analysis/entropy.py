"""Activation entropy of the quantized input of every quantized linear layer (paper Sec. 3.2, Fig. 2; the proxy
H(x_q) = -sum p(x_q) log p(x_q) that precedes Eq. 4).

The paper correlates a layer's activation entropy with its DED (discretization error difference, Sec. 3.2) and
uses entropy as a cheap proxy for cross-layer dependency. We compute H exactly as the equation reads: the
probability is taken over the quantization LEVELS (the integer codes x_q), not over magnitudes.

    codes(x, bits, ...)          per-token (or per-tensor) integer codes, shifted to 0..K-1 (K = 2^bits)
    level_counts(c, bits)        histogram over the K levels
    entropy(counts)              plug-in (maximum-likelihood) or Miller-Madow estimate, in nats
    run_entropy(model, ...)      forward hooks on calibration data (TRAIN split) -> EntropyStats
    save_entropy / load_entropy  artifact (the config is stored inside the file)

Per-token scales are handled explicitly: every token is quantized with ITS OWN step size (dynamic per-token
activation quantization, `qvlm.quant.act_qparams(..., "token")`), and the codes of all tokens are pooled into
one histogram. Image and text tokens are counted separately: for LLM layers a position is an image token iff
`input_ids == config.image_token_id`; vision-tower and projector layers see only image tokens; padding is ignored.

Differences from the official code (`QuantAct.cal_entropy`, docs/method.md):
that function L2-normalises |x_hat| over tokens and is not a probability; it grows with sequence length
(≈15 → 51 for T = 100 → 600). Ours is bounded by log K and independent of T.

References: Shannon entropy of a histogram; Miller (1955) bias correction; docs/method.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..config import QuantConfig
from ..core.hooks import InputTap, calib_batches, check_train_split, image_token_id, model_inputs, token_masks
from ..core.quant import FP_BITS, act_qparams, check_bits, qrange, quantize
from ..core.units import find_units, layer_of, unit_name
from ..errors import QVLMError
from ..models import llava
from ..utils import load_artifact, save_artifact

ESTIMATORS = ("plugin", "miller_madow")
SPLITS = ("all", "image", "text")
AGGREGATES = ("pooled", "mean")


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

    def layers(self) -> list[str]:
        """Transformer-layer keys ('vision.0', ..., 'projector.0', 'llm.0', ...) in forward order."""
        return list(dict.fromkeys(layer_of(u[0]) for u in self.units))

    def layer_entropy(self, split: str = "all", estimator: str = "plugin", aggregate: str = "pooled") -> list[float]:
        """H(x_q) per transformer layer (forward order), from its units' quantized inputs (each distinct input
        once): "pooled" = entropy of the summed code histogram of all its inputs (every coded element counts
        once, so wide inputs such as down_proj's weigh more); "mean" = mean of its units' entropies."""
        if aggregate not in AGGREGATES:
            raise QVLMError(f"unknown aggregate {aggregate!r}", f"use one of {', '.join(AGGREGATES)}")
        if split not in SPLITS:
            raise QVLMError(f"unknown token split {split!r}", f"use one of {', '.join(SPLITS)}")
        row = {k: i for i, k in enumerate(self.keys)}
        out = []
        for layer in self.layers():
            firsts = [u[0] for u in self.units if layer_of(u[0]) == layer]
            if aggregate == "pooled":
                out.append(entropy(sum(self.counts[split][row[k]] for k in firsts), estimator))
            else:
                hs = [entropy(self.counts[split][row[k]], estimator) for k in firsts]
                hs = [h for h in hs if not math.isnan(h)]
                out.append(sum(hs) / len(hs) if hs else math.nan)
        return out

    def layer_parts(self) -> list[str]:
        return [k.split(".")[0] for k in self.layers()]

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
    zero_point = getattr(module, "a_zero_point", None)
    return scale, torch.zeros_like(scale) if zero_point is None else zero_point


def act_codes(x: torch.Tensor, qcfg: QuantConfig, bits: int, module: nn.Module | None = None) -> torch.Tensor:
    """Codes (0..K-1) of a linear's input under qcfg's activation quantizer (see act_step)."""
    scale, zero_point = act_step(x, qcfg, bits, module)
    return codes(x, bits, qcfg.a_symmetric, qcfg.a_granularity, scale, zero_point)


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
        valid, image = (m.reshape(-1).cpu() for m in token_masks(state["batch"], x, img_id, info.part))   # (N,), (N,)
        for split, m in (("all", valid), ("image", valid & image), ("text", valid & ~image)):
            counts[split][row[key]] += level_counts(c[m], bits)

    with InputTap({k: infos[k].module for k in keys}, on_input):
        for batch in calib_batches(samples, processor, batch_size):
            state["batch"] = batch
            model(**model_inputs(model, batch))
    cfg = dict(bits=bits, a_symmetric=qcfg.a_symmetric, a_granularity=qcfg.a_granularity, scope=list(scope),
               n_calib=len(samples), **(meta or {}))
    return EntropyStats(cfg, keys, [infos[k].part for k in keys], [list(u.keys) for u in units], counts)


# ------------------------------------------------------------------------------------------- artifacts
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


# ------------------------------------------------------------------------------------------- tables
def run_profiles(model: nn.Module, processor, samples: list[dict], bits_list, batch_size: int = 16,
                 meta: dict | None = None) -> dict[int, EntropyStats]:
    """run_entropy at each activation bit-width: {bits: EntropyStats}."""
    return {b: run_entropy(model, processor, samples, QuantConfig(a_bits=b), batch_size=batch_size, meta=meta)
            for b in sorted(bits_list)}


def profile_frame(stats: dict[int, EntropyStats], estimator: str = "plugin") -> pd.DataFrame:
    """One row per (bits, quantized linear): pos, key, part, layer, unit, H_all, H_image, H_text, n_codes, log_K."""
    rows = []
    for b, st in stats.items():
        unit_of = {k: unit_name(u) for u in st.units for k in u}
        for i, r in enumerate(st.table(estimator)):
            rows.append(dict(pos=i, bits=b, name=r["key"], layer=layer_of(r["key"]), unit=unit_of[r["key"]], **r))
    return pd.DataFrame(rows)


def layer_frame(stats: dict[int, EntropyStats], estimator: str = "plugin") -> pd.DataFrame:
    """One row per (bits, transformer layer): H pooled and H mean over its inputs, all / image / text tokens."""
    rows = []
    for b, st in stats.items():
        cols = {f"H_{agg}_{split}": st.layer_entropy(split, estimator, agg) for agg in AGGREGATES
                for split in ("all", "image")}
        for i, (layer, part) in enumerate(zip(st.layers(), st.layer_parts())):
            rows.append(dict(pos=i, bits=b, layer=layer, part=part, **{k: v[i] for k, v in cols.items()}))
    return pd.DataFrame(rows)


def bits_scaling(profile: pd.DataFrame) -> pd.DataFrame:
    """Mean entropy gain per part from the lowest bit-width to each higher one, beside the high-resolution
    prediction log((2^(b-1) - 1) / (2^(b0-1) - 1)) (each extra bit halves the step: +log 2 per bit)."""
    wide = profile.pivot_table(index="key", columns="bits", values="H_all")
    bits = sorted(wide.columns)
    lo = bits[0]
    part = profile.drop_duplicates("key").set_index("key")["part"]
    gain = pd.DataFrame({f"{lo}->{b}": wide[b] - wide[lo] for b in bits[1:]})
    gain["part"] = part.loc[gain.index]
    out = gain.groupby("part").mean()
    out.loc["high-resolution prediction"] = pd.Series(
        {f"{lo}->{b}": math.log((2 ** (b - 1) - 1) / (2 ** (lo - 1) - 1)) for b in bits[1:]})
    return out


def check_profiles(stats: dict[int, EntropyStats]) -> dict[int, dict]:
    """Assert what holds in any mode (0 <= H <= log K per input; more bits never lower H), and return per
    bit-width: mean H, the spread across units (max - min), log K."""
    out, prev = {}, None
    for b, st in sorted(stats.items()):
        h = [x for x in st.entropy("all") if not math.isnan(x)]
        assert len(h) == len(st.keys) and all(0.0 <= x <= b * math.log(2) + 1e-9 for x in h), (b, min(h), max(h))
        if prev is not None:
            assert all(x > y for x, y in zip(st.entropy("all"), prev)), "H(x_q) not increasing in bits"
        prev = st.entropy("all")
        u = st.unit_entropy()
        out[b] = dict(mean_H=sum(h) / len(h), spread_H=max(u) - min(u), log_K=b * math.log(2))
    return out


def stability(model: nn.Module, processor, samples: list[dict], bits: int, batch_size: int = 16) -> dict:
    """Largest and mean |H(half) - H(all)| over the linear inputs when the second half of `samples` is dropped."""
    full = run_entropy(model, processor, samples, QuantConfig(a_bits=bits), batch_size=batch_size).entropy()
    half = run_entropy(model, processor, samples[: max(1, len(samples) // 2)], QuantConfig(a_bits=bits),
                       batch_size=batch_size).entropy()
    d = [abs(a - b) for a, b in zip(half, full)]
    return dict(bits=bits, n_half=max(1, len(samples) // 2), n_all=len(samples), max_abs_diff=max(d),
                mean_abs_diff=sum(d) / len(d))


def image_vs_text(profile: pd.DataFrame, bits: int) -> dict:
    """The LLM's distinct inputs at `bits`: rows (unit, H_image, H_text) and their means, and the share of inputs
    whose image tokens have the higher entropy."""
    llm = profile[(profile["part"] == "llm") & (profile["bits"] == bits)].drop_duplicates("unit")
    rows = llm[["unit", "layer", "H_image", "H_text"]].reset_index(drop=True)
    return dict(rows=rows, summary=dict(H_image=float(rows["H_image"].mean()), H_text=float(rows["H_text"].mean()),
                                        frac_image_higher=float((rows["H_image"] > rows["H_text"]).mean())))
