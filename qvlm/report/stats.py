"""Statistics of compared results: mean +- std over calibration seeds, and orderings that mean something.

    table = summarize(rows)                       one row per (method, setting[, transform]): mean, std, n
    order(a, b)                                   ">" / "<" only if the mean +- std intervals do not overlap, else
                                                  "tied" (the repo's rule for every ordering claim)
    binomial_se(p, n)                             standard error of an accuracy measured on n samples

A single evaluation of n samples has a binomial standard error sqrt(p (1 - p) / n) (about 1.1 points at p = 0.85,
n = 1000): differences below two of those are noise, which is why every compared cell has >= 3 seeds.
"""
from __future__ import annotations

import math

import pandas as pd

METRICS = ("accuracy", "wall_s", "cpu_s", "linear_passes", "block_passes", "peak_memory_bytes", "n_blocks", "steps",
           "veo_H_before", "veo_H_after")
KEYS = ("variant", "method", "setting", "transform")


def summarize(rows: list[dict], metrics=METRICS, keys=KEYS) -> pd.DataFrame:
    """Per-seed rows -> one row per key: <metric>_mean, <metric>_std (sample std, 0 for one seed), n_seeds, seeds.
    Keys absent from the rows are dropped; row order follows first appearance."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    keys = [k for k in keys if k in df.columns]
    metrics = [m for m in metrics if m in df.columns]
    out = []
    for key, g in df.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rec = dict(zip(keys, key))
        for m in metrics:
            vals = g[m].dropna().astype(float)
            if vals.empty:
                continue
            rec[f"{m}_mean"] = float(vals.mean())
            rec[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        rec["n_seeds"] = len(g)
        rec["seeds"] = list(g["seed"]) if "seed" in g else []
        out.append(rec)
    return pd.DataFrame(out)


def interval(mean: float, std: float) -> tuple[float, float]:
    return mean - std, mean + std


def order(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'>' if interval a = mean +- std lies wholly above b's, '<' if wholly below, else 'tied'."""
    (lo_a, hi_a), (lo_b, hi_b) = interval(*a), interval(*b)
    if lo_a > hi_b:
        return ">"
    if hi_a < lo_b:
        return "<"
    return "tied"


def cell(table: pd.DataFrame, metric: str = "accuracy", **key) -> tuple[float, float] | None:
    """(mean, std) of `metric` for the summary row matching `key` (e.g. method="qvlm", setting="W4A4"), or None."""
    m = table
    for k, v in key.items():
        if k not in m.columns:
            return None
        m = m[m[k] == v]
    if m.empty:
        return None
    r = m.iloc[0]
    return float(r[f"{metric}_mean"]), float(r[f"{metric}_std"])


def pm(mean_std: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    """'84.6 ± 0.4' (accuracies as percent by default); '–' when missing."""
    if mean_std is None or any(map(math.isnan, mean_std)):
        return "–"
    m, s = mean_std
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent samples."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))
