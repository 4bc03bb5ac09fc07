"""`qvlm`: Q-VLM (Wang et al., NeurIPS 2024) -- the paper's full method (Sec. 3), not the official code's shortcuts.

Pipeline (each step a package module; search and apply separated, R10):

    1. VEO  (optional, qvlm.disentangle, Sec. 3.3 / Eq. 5): optimise the vision tower's chosen parameters on
            L_AR + eta * sum_k gamma_k H~_k over the LLM layers' quantized inputs, on the FP model.
    2. profile (qvlm.entropy / qvlm.dependency, Sec. 3.2, Eq. 4): entropy H(x_q) of every unit's quantized input
            (or the conditional entropy D(k, {k+1})) on the calibration data (TRAIN split).
    3. partition (qvlm.partition): merge consecutive units whose edge score reaches the p-threshold, capped at
            max_depth units per block, never across vision | projector | LLM.
    4. rounding (qvlm.rounding): for each block, in forward order, jointly learn AdaRound rounding offsets and
            activation steps of all its linears on the block's output (quantized-path input, FP target), with
            the shared `qvlm.methods.reconstruct.reconstruct`; blocks are sequential (each sees the quantized
            outputs of earlier ones) inside the shared driver `qvlm.calib.calibrate`.

Order (R): the issue lists "profile -> partition -> VEO -> rounding"; by default we run VEO FIRST
(`veo_stage="before_partition"`) because the paper's point is that VEO lowers entropy so the partition can use
smaller blocks -- the partition must see the post-VEO profile. `veo_stage="after_partition"` gives the other order.
Note that with the scale-free quantile threshold the NUMBER of merged edges is fixed by p; VEO then only
reorders which edges merge. With threshold="absolute" VEO can shrink the blocks, as in the paper.

Artifact: `run_qvlm` returns a QVLMResult (config, VEO parameters, profile, partition, rounding decisions);
`save_qvlm` / `load_qvlm` / `apply_qvlm(model, result)` rebuild the quantized model from an FP one without data.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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

VEO_STAGES = ("before_partition", "after_partition")


@dataclass(frozen=True)
class QVLMConfig(ReconConfig):
    """Q-VLM knobs. Rounding-search fields (iters, lr, lr_act, reg_weight, beta_*, warmup, drop_prob) are
    ReconConfig's, shared with AdaRound / BRECQ so the comparison changes only the partition and VEO."""
    learn_act: bool = True               # Q-VLM searches activation steps jointly with the rounding (§3.2)
    # -- partition (qvlm.partition) --
    p: float = 0.5                       # merge edges whose score is >= the p-quantile of the profile (Fig. 3(b))
    threshold: str = "quantile"          # "quantile" (scale-free; the official code also uses a relative, mean,
                                         # threshold) | "absolute" (p in nats)
    max_depth: int = 3                   # max units per block (Fig. 3(a)); 3 = the official forced refresh period
    split: str = "weakest"               # cut over-long merged runs at their weakest edge | "greedy"
    proxy: str = "entropy"               # edge score: "entropy" H(x_q) of the successor | "dependency" Eq. 4 D
    pairing: str = "index"               # Eq. 4 co-location when proxy="dependency" (qvlm.dependency)
    estimator: str = "plugin"            # entropy estimator: "plugin" | "miller_madow"
    profile_bits: int = 0                # bits of the code histograms; 0 = a_bits (8 when activations stay FP)
    n_profile: int = 0                   # calibration samples for the profile and VEO; 0 = all of them
    # -- visual encoder optimization (qvlm.disentangle) --
    veo: bool = True                     # run VEO (Table 1 "+VEO"); False = CDM-only ablation
    veo_stage: str = "before_partition"  # see the module docstring
    eta: float = 0.1                     # entropy weight (Fig. 3(b)); L_AR and the gamma-weighted mean entropy are nats
    veo_iters: int = 50                  # VEO Adam steps over the calibration batches
    veo_lr: float = 1e-3                 # VEO learning rate (LayerNorm affine)
    encoder_params: str = "layernorm"    # which vision-tower parameters VEO trains: layernorm | layernorm+last | all
    n_last: int = 1                      # with layernorm+last: number of last used vision layers trained fully

    def __post_init__(self):
        qpart.PartitionConfig(p=self.p, threshold=self.threshold, max_depth=self.max_depth, split=self.split,
                              proxy=self.proxy)
        self.veo_config()
        if self.veo_stage not in VEO_STAGES:
            raise QVLMError(f"unknown veo_stage {self.veo_stage!r}", f"use one of {', '.join(VEO_STAGES)}")
        if self.pairing not in qdep.PAIRINGS:
            raise QVLMError(f"unknown pairing {self.pairing!r}", f"use one of {', '.join(qdep.PAIRINGS)}")
        if self.estimator not in qent.ESTIMATORS:
            raise QVLMError(f"unknown estimator {self.estimator!r}", f"use one of {', '.join(qent.ESTIMATORS)}")

    def recon_config(self) -> ReconConfig:
        return ReconConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ReconConfig)})

    def partition_config(self) -> qpart.PartitionConfig:
        return qpart.PartitionConfig(p=self.p, threshold=self.threshold, max_depth=self.max_depth, split=self.split,
                                     proxy=self.proxy)

    def veo_config(self, batch_size: int = 8) -> veo.VEOConfig:
        return veo.VEOConfig(eta=self.eta, iters=self.veo_iters, lr=self.veo_lr, encoder_params=self.encoder_params,
                             n_last=self.n_last, batch_size=batch_size)


# ------------------------------------------------------------------------------------------- search
@dataclass
class QVLMResult:
    """Everything the search decided (R10 artifact): config, VEO parameters, profile, partition, rounding."""
    config: dict
    veo: dict | None                      # asdict(VEOResult) or None
    profile: dict                         # {"units", "parts", "unit_entropy", "edge_scores"}
    partition: dict                       # asdict(Partition)
    decisions: dict                       # asdict(rounding.Decisions)
    timings: dict = field(default_factory=dict)

    def stats(self) -> dict:
        """A JSON-able summary (what `quantize()` reports as info['blocks'])."""
        part = qpart.Partition(**self.partition)
        units = [unit_name(u) for u in part.units]
        blocks = self.decisions["blocks"]
        out = dict(partition=[[units[i] for i in b] for b in part.blocks], **qpart.summary(part.blocks),
                   loss_rtn=sum(b["loss_rtn"] or 0.0 for b in blocks), loss=sum(b["loss"] or 0.0 for b in blocks),
                   n_reverted=sum(bool(b["reverted"]) for b in blocks), **self.timings)
        if self.veo is not None:
            out["veo"] = veo.summary(veo.VEOResult(**self.veo))
        return out


def profile_bits(qcfg: QuantConfig, cfg: QVLMConfig) -> int:
    """Bit-width of the level histograms: profile_bits, else a_bits, else 8 for FP activations (weight-only)."""
    return cfg.profile_bits or (qcfg.a_bits if qcfg.a_bits < FP_BITS else 8)


def run_profile(model, processor, samples, qcfg: QuantConfig, cfg: QVLMConfig, batch_size: int) -> dict:
    """Step 2: units, their entropy, and the edge scores of the chosen proxy."""
    bits = profile_bits(qcfg, cfg)
    stats = qent.run_entropy(model, processor, samples, qcfg, bits=bits, batch_size=batch_size)
    parts = [stats.parts[stats.keys.index(u[0])] for u in stats.units]
    h = stats.unit_entropy("all", cfg.estimator)
    if cfg.proxy == "entropy":
        scores = qpart.entropy_edge_scores(h)
    else:
        dep = qdep.run_dependency(model, processor, samples, qcfg, bits=bits, pairing=cfg.pairing,
                                  batch_size=batch_size)
        scores = dep.dependency(cfg.estimator)
    return dict(units=stats.units, parts=parts, unit_entropy=h, edge_scores=scores, bits=bits)


def _veo(model, processor, samples, qcfg, cfg, seed, batch_size) -> dict:
    res = veo.run_disentangle(model, processor, samples, cfg.veo_config(batch_size), qcfg,
                              bits=profile_bits(qcfg, cfg), seed=seed)
    return asdict(res)


def run_qvlm(model, processor, samples: list[dict], qcfg: QuantConfig, cfg: QVLMConfig | None = None, *,
             batch_size: int = 16, seed: int = 0, progress: bool = False, meta: dict | None = None) -> QVLMResult:
    """Quantize `model` IN PLACE with Q-VLM; returns the search artifact (see the module docstring)."""
    cfg = cfg or QVLMConfig()
    if qcfg.weight_format != "int":
        raise QVLMError("qvlm learns rounding and needs weight_format 'int'", "use --method rtn for NF4 weights")
    qent.check_train_split(samples)
    prof_samples = samples[: cfg.n_profile] if cfg.n_profile else samples
    timings, veo_res = {}, None
    torch.manual_seed(seed)
    run_veo = cfg.veo and cfg.veo_iters > 0 and "llm" in qcfg.scope     # VEO lowers the LLM layers' entropy
    t = time.perf_counter()
    if run_veo and cfg.veo_stage == "before_partition":
        veo_res = _veo(model, processor, prof_samples, qcfg, cfg, seed, batch_size)
    timings["veo_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    prof = run_profile(model, processor, prof_samples, qcfg, cfg, batch_size)
    part = qpart.run_partition(prof["units"], prof["parts"], prof["edge_scores"], cfg.partition_config())
    timings["profile_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    if run_veo and cfg.veo_stage == "after_partition":
        veo_res = _veo(model, processor, prof_samples, qcfg, cfg, seed, batch_size)
    timings["veo_seconds"] += time.perf_counter() - t
    t = time.perf_counter()
    torch.manual_seed(seed)
    dec = qround.run_rounding(model, processor, samples, qcfg, part.block_keys(), cfg.recon_config(),
                              units=prof["units"], batch_size=batch_size, progress=progress)
    timings["rounding_seconds"] = time.perf_counter() - t
    config = dict(asdict(cfg), quant=asdict(qcfg), n_calib=len(samples), seed=seed, **(meta or {}))
    return QVLMResult(config, veo_res, prof, asdict(part), asdict(dec), timings)


# ------------------------------------------------------------------------------------------- artifacts / apply
def artifact_name(model: str, qcfg: QuantConfig, n_calib: int, seed: int) -> str:
    """`{model}-w{W}a{A}[-g{G}]-n{N}-s{seed}-qvlm.pt` (the config is stored inside too)."""
    return f"{Path(model).name or 'model'}-{qcfg.tag}-n{n_calib}-s{seed}-qvlm.pt"


def save_qvlm(res: QVLMResult, path) -> Path:
    """Write `res` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("qvlm", res, path)


def load_qvlm(path) -> QVLMResult:
    """Inverse of save_qvlm."""
    return load_artifact("qvlm", QVLMResult, path, "qvlm.methods.qvlm.save_qvlm")


def apply_qvlm(model, res: QVLMResult):
    """FP model -> the quantized model the search produced: VEO parameters, then the rounding decisions."""
    if res.veo is not None:
        veo.apply_disentangle(model, veo.VEOResult(**res.veo))
    return qround.apply_decisions(model, qround.Decisions(**res.decisions))
