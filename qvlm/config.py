"""Configuration dataclasses, presets and `resolve()` -- every default is written once, here.

    QuantConfig : what is quantized and how (w_bits, a_bits, group_size, symmetry, granularity, scope)
    CalibConfig : calibration data (n_calib samples from the TRAIN split, seed, batch size)
    EvalConfig  : evaluation data (dataset, split, number of samples, batch size)
    RunConfig   : one notebook / CLI run (mode, preset, model, seeds, out_dir, sizes from the presets)
    PRESETS     : sizes per (mode, preset): mode "smoke" (same code, small sizes; CI) | "full" (what we report);
                  preset "cpu" (fits `make reproduce` on 2 cores) | "gpu" (paper-scale settings)
    parse_setting("W4A16G32") -> QuantConfig   (the one parser of setting labels)

Method-specific knobs live in a dataclass next to the method (e.g. `qvlm.methods.gptq.GPTQConfig`), each
default written once there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import re

from .core.quant import check_bits, check_w_clip
from .errors import QVLMError
from .paths import RESULTS_DIR

SCOPES = ("vision", "projector", "llm")   # the three parts of a LLaVA model that hold quantizable linears


@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 4
    a_bits: int = 4
    group_size: int = 0                  # 0 = one scale per output channel; else per group of input channels
    w_symmetric: bool = True             # symmetric weights: integer GEMM needs no zero-point correction
    w_clip: str = "minmax"               # weight range: "minmax" | "mse" (per-group clip-ratio search, QuaRot's w_clip)
    a_symmetric: bool = True
    a_granularity: str = "token"         # "token": dynamic per-token scales | "tensor": static, calibrated
    weight_format: str = "int"           # "int": uniform integer grid | "nf4": bitsandbytes NF4 (official code)
    scope: tuple = SCOPES                # parts whose linears are quantized; lm_head and embeddings stay FP

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_w_clip(self.w_clip)
        if self.a_granularity not in ("token", "tensor"):
            raise QVLMError(f"unknown a_granularity {self.a_granularity!r}", "use 'token' or 'tensor'")
        if self.weight_format not in ("int", "nf4"):
            raise QVLMError(f"unknown weight_format {self.weight_format!r}", "use 'int' or 'nf4'")
        scope = tuple(self.scope.split(",")) if isinstance(self.scope, str) else tuple(self.scope)
        bad = [s for s in scope if s not in SCOPES]
        if bad or not scope:
            raise QVLMError(f"unknown scope {bad or scope!r}", f"use a comma-separated subset of {','.join(SCOPES)}")
        object.__setattr__(self, "scope", scope)

    @property
    def tag(self) -> str:
        """File-name form: 'w4a4', 'w4a16-g32'."""
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"w{self.w_bits}a{self.a_bits}{g}"

    @property
    def setting(self) -> str:
        """Table form, the inverse of parse_setting: 'W4A4', 'W4A16G32'."""
        return f"W{self.w_bits}A{self.a_bits}" + (f"G{self.group_size}" if self.group_size else "")


def parse_setting(label: str, **fields) -> QuantConfig:
    """'W4A4' / 'W4A16G32' (case-insensitive) -> QuantConfig; other QuantConfig fields as keywords."""
    m = re.fullmatch(r"W(\d+)A(\d+)(?:G(\d+))?", str(label).strip().upper())
    if not m:
        raise QVLMError(f"bad setting {label!r}", "write settings like W4A4, W6A6, W4A16 or W4A16G32")
    return QuantConfig(w_bits=int(m[1]), a_bits=int(m[2]), group_size=int(m[3] or 0), **fields)


def parse_settings(labels: str) -> list[QuantConfig]:
    """'W8A8,W4A4' -> [QuantConfig, ...]."""
    out = [parse_setting(t) for t in str(labels).split(",") if t.strip()]
    if not out:
        raise QVLMError("no quantization setting given", "pass e.g. W4A4,W6A6")
    return out


@dataclass(frozen=True)
class CalibConfig:
    n_calib: int = 64                    # calibration samples, drawn from the TRAIN split only
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n_calib, int) or self.n_calib < 1:
            raise QVLMError(f"empty calibration set (n_calib={self.n_calib})", "pass --calib N with N >= 1")


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "tiny"                # "tiny": the synthetic set | a local ScienceQA parquet directory
    split: str = "test"
    n_eval: int = 0                      # first n samples of the split; 0 = all of it
    batch_size: int = 32


# Sizes per (mode, preset). Smoke changes sizes only, never the algorithm, and is the same on every preset.
#   n_calib    calibration samples (TRAIN split)          n_eval     test samples (0 = the whole split)
#   iters      optimisation steps of each learned search   ded_iters  steps of each search that only MEASURES
#   n_seeds    calibration seeds of every compared cell               dependency (notebook 02)
#   batch_size calibration / evaluation batch
PRESETS: dict[str, dict[str, dict]] = {
    "smoke": {p: dict(n_calib=8, n_eval=200, iters=10, ded_iters=20, n_seeds=2, batch_size=16) for p in ("cpu", "gpu")},
    "full": {
        # cpu: small searches for 2 CPU cores (16 calibration samples = one batch, 10 steps per layer-sized block,
        # 500 test samples), identical for every method so comparisons stay fair; on smol one learned search still
        # takes minutes, so notebooks 03 and 05 take hours (README, runtime table)
        "cpu": dict(n_calib=16, n_eval=500, iters=10, ded_iters=10, n_seeds=3, batch_size=16),
        # gpu: paper-scale settings (BRECQ / AdaRound practice: thousands of steps, 128 calibration samples)
        "gpu": dict(n_calib=128, n_eval=0, iters=2000, ded_iters=1000, n_seeds=3, batch_size=32),
    },
}
MODES, PRESET_NAMES = tuple(PRESETS), ("cpu", "gpu")


@dataclass(frozen=True)
class RunConfig:
    """One notebook / CLI run. `params` records the caller's parameters verbatim (what the run was asked for)."""
    mode: str = "full"
    preset: str = "cpu"
    model: str = "tiny"
    dataset: str = "tiny"
    seed: int = 0
    out_dir: str = ""
    notebook: str = ""
    n_calib: int = 0
    n_eval: int = 0
    iters: int = 0
    ded_iters: int = 0
    n_seeds: int = 0
    batch_size: int = 0
    quant: QuantConfig = field(default_factory=QuantConfig)
    params: dict = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        """The calibration seeds of every compared cell: seed, seed + 1, ..."""
        return [self.seed + i for i in range(self.n_seeds)]

    def calib(self, seed: int | None = None) -> CalibConfig:
        return CalibConfig(n_calib=self.n_calib, batch_size=self.batch_size, seed=self.seed if seed is None else seed)

    def eval(self, split: str = "test") -> EvalConfig:
        return EvalConfig(dataset=self.dataset, split=split, n_eval=self.n_eval, batch_size=self.batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve(mode: str = "full", *, preset: str = "cpu", model: str = "tiny", dataset: str = "tiny", seed: int = 0,
            out_dir: str = "", notebook: str = "", w_bits: int = 4, a_bits: int = 4, group_size: int = 0,
            n_calib: int = 0, n_eval: int = -1, iters: int = 0, n_seeds: int = 0,
            params: dict | None = None) -> RunConfig:
    """Parameters (a notebook's parameters cell or the CLI) -> RunConfig. 0 / "" / -1 = the preset's value."""
    if mode not in PRESETS:
        raise QVLMError(f"unknown MODE {mode!r}", f"use one of {', '.join(MODES)}")
    if preset not in PRESETS[mode]:
        raise QVLMError(f"unknown PRESET {preset!r}", f"use one of {', '.join(PRESET_NAMES)}")
    p = PRESETS[mode][preset]
    out = Path(out_dir) if out_dir else RESULTS_DIR / (notebook or "run") / mode
    return RunConfig(
        mode=mode, preset=preset, model=model, dataset=dataset, seed=seed, out_dir=str(out), notebook=notebook,
        n_calib=n_calib or p["n_calib"], n_eval=p["n_eval"] if n_eval < 0 else n_eval, iters=iters or p["iters"],
        ded_iters=p["ded_iters"], n_seeds=n_seeds or p["n_seeds"], batch_size=p["batch_size"],
        quant=QuantConfig(w_bits=w_bits, a_bits=a_bits, group_size=group_size), params=dict(params or {}))
