"""Configuration dataclasses, presets and `resolve()` -- every default is written once, here.

    QuantConfig : what is quantized and how (w_bits, a_bits, group_size, symmetry, granularity, scope)
    CalibConfig : calibration data (n_calib samples from the TRAIN split, seed, batch size)
    RunConfig   : one notebook / CLI run (mode, model, seed, out_dir, sizes from the mode's preset)
    PRESETS     : "smoke" (same code, small sizes; CI) and "full" (the numbers we report)

Method-specific knobs live in a dataclass next to the method (e.g. `qvlm.methods.gptq.GPTQConfig`), each
default written once there.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QVLMError
from .paths import RESULTS_DIR
from .quant import check_bits

SCOPES = ("vision", "projector", "llm")   # the three parts of a LLaVA model that hold quantizable linears


@dataclass(frozen=True)
class QuantConfig:
    w_bits: int = 4
    a_bits: int = 4
    group_size: int = 0                  # 0 = one scale per output channel; else per group of input channels
    w_symmetric: bool = True             # symmetric weights: integer GEMM needs no zero-point correction
    a_symmetric: bool = True
    a_granularity: str = "token"         # "token": dynamic per-token scales | "tensor": static, calibrated
    weight_format: str = "int"           # "int": uniform integer grid | "nf4": bitsandbytes NF4 (official code)
    scope: tuple = SCOPES                # parts whose linears are quantized; lm_head and embeddings stay FP

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
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
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"w{self.w_bits}a{self.a_bits}{g}"


@dataclass(frozen=True)
class CalibConfig:
    n_calib: int = 64                    # calibration samples, drawn from the TRAIN split only
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n_calib, int) or self.n_calib < 1:
            raise QVLMError(f"empty calibration set (n_calib={self.n_calib})", "pass --calib N with N >= 1")


# Sizes per mode. Smoke changes sizes only, never the algorithm.
PRESETS: dict[str, dict] = {
    "smoke": dict(n_calib=8, n_eval=48, iters=20, ded_iters=20, n_seeds=2, batch_size=16),
    "full": dict(n_calib=64, n_eval=0, iters=200, ded_iters=100, n_seeds=3, batch_size=32),   # n_eval 0: whole test
}
# ded_iters: steps of each rounding search that only MEASURES dependency (notebook 02 runs 2 searches per edge, per
# seed, ~140 in full mode); 100 keeps `make reproduce` under an hour on 2 cores. The quantizing searches use iters.


@dataclass(frozen=True)
class RunConfig:
    mode: str = "full"
    model: str = "tiny"
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
    extra: dict = field(default_factory=dict)

    def calib(self) -> CalibConfig:
        return CalibConfig(n_calib=self.n_calib, batch_size=self.batch_size, seed=self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve(mode: str = "full", *, model: str = "tiny", seed: int = 0, out_dir: str = "", notebook: str = "",
            w_bits: int = 4, a_bits: int = 4, group_size: int = 0, n_calib: int = 0, n_eval: int = -1,
            iters: int = 0, **extra) -> RunConfig:
    """Parameters (from a notebook's parameters cell or the CLI) -> RunConfig. 0 / "" = the mode's preset."""
    if mode not in PRESETS:
        raise QVLMError(f"unknown MODE {mode!r}", f"use one of {sorted(PRESETS)}")
    p = PRESETS[mode]
    out = Path(out_dir) if out_dir else RESULTS_DIR / (notebook or "run") / mode
    return RunConfig(
        mode=mode, model=model, seed=seed, out_dir=str(out), notebook=notebook,
        n_calib=n_calib or p["n_calib"], n_eval=p["n_eval"] if n_eval < 0 else n_eval,
        iters=iters or p["iters"], ded_iters=p["ded_iters"], n_seeds=p["n_seeds"], batch_size=p["batch_size"],
        quant=QuantConfig(w_bits=w_bits, a_bits=a_bits, group_size=group_size), extra=extra)
