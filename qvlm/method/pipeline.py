"""Q-VLM (Wang et al., NeurIPS 2024): the paper's full method (Sec. 3), not the official code's shortcuts.

Pipeline (each step its own module; search and apply separated):

    1. profile   (qvlm.analysis.entropy, Sec. 3.2): entropy H(x_q) of the quantized inputs of every transformer
                 layer (vision layers, projector, decoder layers; `granularity="unit"`: of every linear unit) on the
                 calibration data (TRAIN split); or Eq. 4's conditional entropy D between consecutive layers
                 (`proxy="dependency"`, qvlm.analysis.dependency). The merge threshold is fixed on THIS profile.
    2. VEO       (optional, qvlm.method.disentangle, Sec. 3.3 / Eq. 5): a new vision encoder that lowers the
                 entropy of the LLM's quantized inputs; kept only if the FP accuracy on val stays within the guard.
    3. profile again on the model with the new encoder, and partition (qvlm.method.partition): merge consecutive
                 layers whose score reaches the threshold of step 1, capped at max_depth layers per block, never
                 across vision | projector | LLM. Lower entropy after VEO -> fewer merges -> finer blocks, cheaper
                 search: the paper's argument, and why the threshold is frozen before VEO.
    4. rounding  (qvlm.method.rounding): block by block, in forward order, AdaRound rounding + activation
                 quantizers of all the block's linears learned jointly on the block's residual output; `iters` per
                 block, or a fixed total `budget` split over the blocks (equal steps, or equal compute:
                 `budget_unit`).

Artifact: `run_qvlm` returns a QVLMResult (config, VEO parameters, profiles, partition, rounding decisions);
`save_qvlm` / `load_qvlm` / `apply_qvlm(model, result)` rebuild the quantized model from an FP one without data.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import data as qdata
from ..analysis import dependency as qdep
from ..analysis import entropy as qent
from ..config import QuantConfig
from ..core.quant import FP_BITS
from ..core.reconstruct import ReconConfig
from ..core.units import unit_name
from ..errors import QVLMError
from ..utils import load_artifact, save_artifact
from . import disentangle as veo
from . import partition as qpart
from . import rounding as qround


PARTITIONS = {"entropy": None, "layerwise": "layerwise", "fixed": "fixed_size", "whole": "whole"}


@dataclass(frozen=True)
class QVLMConfig(ReconConfig):
    """Q-VLM knobs. Rounding-search fields (iters, budget, lr, lr_act, reg_weight, beta_*, warmup, drop_prob) are
    ReconConfig's, shared with AdaRound / BRECQ, so a comparison changes only the partition and VEO."""
    learn_act: bool = True               # Q-VLM searches activation quantizers jointly with the rounding (Sec. 3.2)
    # -- partition (qvlm.method.partition) --
    granularity: str = "layer"           # blocks of transformer "layer"s (the paper's unit) | linear "unit"s
    partition: str = "entropy"           # "entropy" (Q-VLM's rule) | baselines: "layerwise" (one layer or unit per
                                         # block), "fixed" (max_depth per block), "whole" (one block per part)
    p: float = 0.5                       # merge edges whose score is >= the p-quantile of the FP profile (Fig. 3(b))
    threshold: str = "quantile"          # "quantile" (scale-free) | "absolute" (p in the proxy's units, nats)
    max_depth: int = 3                   # max layers (units) per block (Fig. 3(a)); 3 = the official refresh period
    split: str = "weakest"               # cut over-long merged runs at their weakest edge | "greedy"
    proxy: str = "entropy"               # edge score: "entropy" H(x_q) of the successor | "dependency" Eq. 4 D
    pairing: str = "residual"            # Eq. 4 co-location when proxy="dependency" (qvlm.analysis.dependency)
    aggregate: str = "pooled"            # a layer's entropy: "pooled" histogram of its inputs | "mean" of its units
    estimator: str = "plugin"            # entropy estimator: "plugin" | "miller_madow"
    profile_bits: int = 0                # bits of the code histograms; 0 = a_bits (8 when activations stay FP)
    n_profile: int = 0                   # calibration samples for the profile and VEO; 0 = all of them
    # -- visual encoder optimization (qvlm.method.disentangle) --
    veo: bool = True                     # run VEO (Table 1 "+VEO"); False = the CDM-only ablation
    eta: float = 1.0                     # VEO entropy weight (Fig. 3(b)); relative to L_AR's gradient by default
    eta_mode: str = "relative"           # "relative": eta x ||grad L_AR|| / ||grad H|| | "absolute"
    veo_anchor: str = "ar"               # what keeps the encoder's function: "ar" L_AR (Eq. 5) | "kl" KL to the FP model
    veo_iters: int = 50                  # VEO Adam steps over the calibration batches
    veo_lr: float = 1e-3                 # VEO learning rate (LayerNorm affine)
    encoder_params: str = "layernorm"    # which vision-tower parameters VEO trains: layernorm | layernorm+last | all
    n_last: int = 1                      # with layernorm+last: number of last used vision layers trained fully
    veo_tokens: str = "image"            # the LLM positions whose entropy VEO lowers: "image" | "all"
    guard: float = 0.003                 # VEO is reverted if FP val accuracy falls by more (0.003 = 0.3 points)
    n_guard: int = 200                   # val samples of the guard check

    def __post_init__(self):
        super().__post_init__()
        self.partition_config()
        self.veo_config()
        if self.granularity not in qround.GRANULARITIES:
            raise QVLMError(f"unknown granularity {self.granularity!r}",
                            f"use one of {', '.join(qround.GRANULARITIES)}")
        if self.pairing not in qdep.PAIRINGS:
            raise QVLMError(f"unknown pairing {self.pairing!r}", f"use one of {', '.join(qdep.PAIRINGS)}")
        if self.estimator not in qent.ESTIMATORS:
            raise QVLMError(f"unknown estimator {self.estimator!r}", f"use one of {', '.join(qent.ESTIMATORS)}")
        if self.aggregate not in qent.AGGREGATES:
            raise QVLMError(f"unknown aggregate {self.aggregate!r}", f"use one of {', '.join(qent.AGGREGATES)}")
        if self.partition not in PARTITIONS:
            raise QVLMError(f"unknown partition {self.partition!r}", f"use one of {', '.join(PARTITIONS)}")
        if self.n_guard < 1:
            raise QVLMError(f"n_guard={self.n_guard} must be >= 1", "pass --n-guard 1 or more")

    def recon_config(self) -> ReconConfig:
        return ReconConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ReconConfig)})

    def partition_config(self, p: float | None = None, threshold: str | None = None) -> qpart.PartitionConfig:
        return qpart.PartitionConfig(p=self.p if p is None else p, threshold=threshold or self.threshold,
                                     max_depth=self.max_depth, split=self.split, proxy=self.proxy)

    def veo_config(self, batch_size: int = 8) -> veo.VEOConfig:
        return veo.VEOConfig(eta=self.eta, eta_mode=self.eta_mode, anchor=self.veo_anchor, iters=self.veo_iters,
                             lr=self.veo_lr,
                             encoder_params=self.encoder_params, n_last=self.n_last, tokens=self.veo_tokens,
                             guard=self.guard, batch_size=batch_size)


# ------------------------------------------------------------------------------------------- search
@dataclass
class QVLMResult:
    """Everything the search decided: config, VEO parameters, the profiles, partition, rounding decisions."""
    config: dict
    veo: dict | None                      # asdict(VEOResult), or None when VEO did not run
    profile: dict                         # the profile the partition saw: units, parts, entropy, edge_scores, bits
    partition: dict                       # asdict(Partition)
    decisions: dict                       # asdict(rounding.Decisions)
    timings: dict = field(default_factory=dict)
    profile_fp: dict | None = None        # the FP-encoder profile that fixed the threshold (when VEO ran)

    def stats(self) -> dict:
        """A JSON-able summary (what `quantize()` reports as info['blocks'])."""
        part = qpart.Partition(**self.partition)
        names = [u[0] if self.config["granularity"] == "layer" else unit_name(u) for u in part.units]
        blocks = self.decisions["blocks"]
        out = dict(granularity=self.config["granularity"], partition=[[names[i] for i in b] for b in part.blocks],
                   **qpart.summary(part.blocks), threshold=part.config.get("threshold_value"),
                   loss_rtn=sum(b["loss_rtn"] or 0.0 for b in blocks), loss=sum(b["loss"] or 0.0 for b in blocks),
                   n_reverted=sum(bool(b["reverted"]) for b in blocks),
                   steps=sum(b["iters"] for b in blocks), **self.timings)
        if self.veo is not None:
            out["veo"] = veo.summary(veo.VEOResult(**self.veo))
        return out


def profile_bits(qcfg: QuantConfig, cfg: QVLMConfig) -> int:
    """Bit-width of the level histograms: profile_bits, else a_bits, else 8 for FP activations (weight-only)."""
    return cfg.profile_bits or (qcfg.a_bits if qcfg.a_bits < FP_BITS else 8)


def run_profile(model, processor, samples, qcfg: QuantConfig, cfg: QVLMConfig, batch_size: int) -> dict:
    """Step 1: the partition's units (transformer layers, or linear units), their entropy, and the edge scores of
    the chosen proxy (score of edge k = dependency between unit k and k+1)."""
    bits = profile_bits(qcfg, cfg)
    stats = qent.run_entropy(model, processor, samples, qcfg, bits=bits, batch_size=batch_size)
    if cfg.granularity == "layer":
        units, parts = [[k] for k in stats.layers()], stats.layer_parts()
        h = stats.layer_entropy("all", cfg.estimator, cfg.aggregate)
        h_image = stats.layer_entropy("image", cfg.estimator, cfg.aggregate)
    else:
        units, parts = stats.units, [stats.parts[stats.keys.index(u[0])] for u in stats.units]
        h, h_image = stats.unit_entropy("all", cfg.estimator), stats.unit_entropy("image", cfg.estimator)
    if cfg.proxy == "entropy":
        scores = qpart.entropy_edge_scores(h)
    else:
        dep = qdep.run_dependency(model, processor, samples, qcfg, bits=bits, pairing=cfg.pairing,
                                  batch_size=batch_size, granularity=cfg.granularity)
        scores = dep.dependency(cfg.estimator)
    return dict(units=units, parts=parts, entropy=h, entropy_image=h_image, edge_scores=scores, bits=bits,
                granularity=cfg.granularity)


def run_qvlm(model, processor, samples: list[dict], qcfg: QuantConfig, cfg: QVLMConfig | None = None, *,
             batch_size: int = 16, seed: int = 0, dataset: str = "tiny", progress: bool = False,
             meta: dict | None = None) -> QVLMResult:
    """Quantize `model` IN PLACE with Q-VLM; returns the search artifact (see the module docstring). VEO's guard
    reads the first `n_guard` samples of the VAL split of `dataset`."""
    cfg = cfg or QVLMConfig()
    if qcfg.weight_format != "int":
        raise QVLMError("qvlm learns rounding and needs weight_format 'int'", "use --method rtn for NF4 weights")
    qent.check_train_split(samples)
    prof_samples = samples[: cfg.n_profile] if cfg.n_profile else samples
    timings, veo_res, prof_fp = {}, None, None
    torch.manual_seed(seed)
    t = time.perf_counter()
    prof = run_profile(model, processor, prof_samples, qcfg, cfg, batch_size)
    thr = qpart.threshold_value(prof["edge_scores"], cfg.p, cfg.threshold)    # fixed on the FP-encoder profile
    timings["profile_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    if cfg.veo and cfg.veo_iters > 0 and "llm" in qcfg.scope:             # VEO lowers the LLM inputs' entropy
        res = veo.run_disentangle(model, processor, prof_samples, cfg.veo_config(batch_size), qcfg,
                                  bits=profile_bits(qcfg, cfg), seed=seed)
        guard = veo.check_guard(model, processor, res, qdata.load_split(dataset, "val", limit=cfg.n_guard),
                                batch_size)
        if not guard["reverted"]:
            veo.apply_disentangle(model, res)
            prof_fp, prof = prof, run_profile(model, processor, prof_samples, qcfg, cfg, batch_size)
        veo_res = asdict(res)
    timings["veo_seconds"] = time.perf_counter() - t
    if cfg.partition == "entropy":
        part = qpart.run_partition(prof["units"], prof["parts"], prof["edge_scores"],
                                   cfg.partition_config(p=thr, threshold="absolute"),
                                   meta=dict(granularity=cfg.granularity, threshold_mode=cfg.threshold,
                                             threshold_value=thr, p_requested=cfg.p))
    else:                                                                 # a baseline partition, same search
        part = qpart.run_baseline(prof["units"], PARTITIONS[cfg.partition], cfg.max_depth)
    t = time.perf_counter()
    torch.manual_seed(seed)
    dec = qround.run_rounding(model, processor, samples, qcfg, part.block_keys(), cfg.recon_config(),
                              granularity=cfg.granularity, units=prof["units"] if cfg.granularity == "unit" else None,
                              batch_size=batch_size, progress=progress)
    timings["rounding_seconds"] = time.perf_counter() - t
    config = dict(asdict(cfg), quant=asdict(qcfg), n_calib=len(samples), seed=seed, **(meta or {}))
    return QVLMResult(config, veo_res, prof, asdict(part), asdict(dec), timings, prof_fp)


# ------------------------------------------------------------------------------------------- artifacts / apply
def artifact_name(model: str, qcfg: QuantConfig, n_calib: int, seed: int) -> str:
    """`{model}-w{W}a{A}[-g{G}]-n{N}-s{seed}-qvlm.pt` (the config is stored inside too)."""
    return f"{Path(model).name or 'model'}-{qcfg.tag}-n{n_calib}-s{seed}-qvlm.pt"


def save_qvlm(res: QVLMResult, path) -> Path:
    """Write `res` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("qvlm", res, path)


def load_qvlm(path) -> QVLMResult:
    """Inverse of save_qvlm."""
    return load_artifact("qvlm", QVLMResult, path, "qvlm.method.pipeline.save_qvlm")


def apply_qvlm(model, res: QVLMResult):
    """FP model -> the quantized model the search produced: VEO parameters, then the rounding decisions."""
    if res.veo is not None and not res.veo["guard"].get("reverted", False):
        veo.apply_disentangle(model, veo.VEOResult(**res.veo))
    return qround.apply_decisions(model, qround.Decisions(**res.decisions))
