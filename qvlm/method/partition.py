"""Entropy-guided block partition (paper Sec. 3.2 "cross-layer dependency mining", Fig. 3(a)/(b)).

Q-VLM searches rounding functions jointly inside a block and sequentially across blocks; the blocks are chosen
from a dependency profile: consecutive layers whose dependency score (entropy H, or D(k, {k+1}) of Eq. 4)
reaches a threshold p are merged into one block, capped at a maximum depth. Everything here is a PURE function
of a score profile, so it is tested on hand-written profiles and reused for any proxy.

What is partitioned: the ordered *units* of `qvlm.entropy.find_units` -- consecutive linears that read the same
input tensor (q/k/v, gate/up) form one unit, because they quantize one activation and cannot be separated by
a block boundary in any meaningful way. A partition is a list of blocks, each a list of consecutive unit indices
covering 0..n-1 exactly once.

Scores live on EDGES: score[k] is the dependency between unit k and unit k+1 (length n-1). With the entropy
proxy the edge score is H(x_q) of the successor's input, H_{k+1} (high entropy of the layer that receives the
rounding error -> strong dependency, Fig. 2); with Eq. 4 it is D(k, {k+1}) directly. A NaN score, or an edge in
`cuts`, is never merged (part boundaries: vision -> projector -> LLM re-index tokens, so the sequential driver
treats each part as its own stage; the official code only partitions LLaMA layers, docs/method.md).

Threshold p (the paper names p but not its scale; docs/method.md):
    threshold="quantile" (default): merge edges whose score is >= the p-quantile of the profile; p = 0.5 merges
        the stronger half of the edges. Scale-free, so one p works for entropy (nats) and D alike.
    threshold="absolute": merge edges whose score is >= p (in the proxy's units).
Max depth (Fig. 3(a)): no block has more than `max_depth` units. A run of merged edges longer than that is cut
    split="weakest" (default): at its lowest-scoring edge, recursively (keeps the strongest pairs together), or
    split="greedy": left to right into chunks of max_depth (what a streaming pass would do).

Baselines: layerwise (every unit alone, = AdaRound-style), transformer_blocks (one transformer layer per block,
= BRECQ), fixed_size (n units per block), whole (one block per part).

References: BRECQ (Li et al. 2021) block granularity; docs/method.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import QVLMError
from ..utils import load_artifact, save_artifact

THRESHOLDS = ("quantile", "absolute")
SPLITS = ("weakest", "greedy")
BASELINES = ("layerwise", "transformer_blocks", "fixed_size", "whole")


@dataclass(frozen=True)
class PartitionConfig:
    p: float = 0.5                 # merge edges whose score is >= the p-quantile of the profile (or >= p, absolute)
    threshold: str = "quantile"    # "quantile": scale-free, one p for any proxy | "absolute": p in the proxy's units
    max_depth: int = 3             # max units per block; 3 = the official code's forced refresh period (docs/method.md)
    split: str = "weakest"         # how a too-long merged run is cut: at its "weakest" edge | "greedy" left to right
    proxy: str = "entropy"         # edge score: "entropy" (H of the successor's input) | "dependency" (Eq. 4 D)

    def __post_init__(self):
        if self.threshold not in THRESHOLDS:
            raise QVLMError(f"unknown threshold mode {self.threshold!r}", f"use one of {', '.join(THRESHOLDS)}")
        if self.split not in SPLITS:
            raise QVLMError(f"unknown split rule {self.split!r}", f"use one of {', '.join(SPLITS)}")
        if not isinstance(self.max_depth, int) or self.max_depth < 1:
            raise QVLMError(f"max_depth={self.max_depth!r} must be an integer >= 1", "pass --max-depth 1 or more")
        if self.threshold == "quantile" and not 0.0 <= self.p <= 1.0:
            raise QVLMError(f"quantile threshold p={self.p} is outside [0, 1]",
                            "pass 0 <= p <= 1, or threshold='absolute'")
        if self.proxy not in ("entropy", "dependency"):
            raise QVLMError(f"unknown dependency proxy {self.proxy!r}", "use 'entropy' or 'dependency'")


# ------------------------------------------------------------------------------------------- helpers
def check_partition(blocks: list[list[int]], n: int) -> list[list[int]]:
    """Assert `blocks` are non-empty runs of consecutive indices covering 0..n-1 exactly once."""
    flat = [i for b in blocks for i in b]
    assert flat == list(range(n)), f"partition does not cover 0..{n - 1} in order: {blocks}"
    assert all(b and b == list(range(b[0], b[0] + len(b))) for b in blocks), f"non-consecutive block in {blocks}"
    return blocks


def threshold_value(scores, p: float, threshold: str = "quantile") -> float:
    """The score an edge must reach to be merged: the p-quantile of the finite scores, or p itself."""
    if threshold == "absolute":
        return float(p)
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return math.inf                                         # nothing measurable -> nothing merged
    return float(torch.quantile(torch.tensor(finite, dtype=torch.float64), p))


def _runs(n: int, merged: list[bool]) -> list[list[int]]:
    """Maximal runs of units joined by merged edges (merged[k] joins unit k and k+1)."""
    blocks = [[0]] if n else []
    for k in range(1, n):
        if merged[k - 1]:
            blocks[-1].append(k)
        else:
            blocks.append([k])
    return blocks


def _cap(run: list[int], scores, max_depth: int, split: str) -> list[list[int]]:
    """Cut a run into blocks of <= max_depth units (at the weakest edge recursively, or greedily)."""
    if len(run) <= max_depth:
        return [run]
    if split == "greedy":
        return [run[i:i + max_depth] for i in range(0, len(run), max_depth)]
    inner = [scores[k] for k in run[:-1]]                        # edge k joins run[k] and run[k] + 1
    cut = min(range(len(inner)), key=lambda i: (inner[i], i)) + 1   # weakest edge; ties -> leftmost
    return _cap(run[:cut], scores, max_depth, split) + _cap(run[cut:], scores, max_depth, split)


# ------------------------------------------------------------------------------------------- the Q-VLM rule
def entropy_partition(scores, p: float = 0.5, max_depth: int = 3, threshold: str = "quantile",
                      split: str = "weakest", cuts=()) -> list[list[int]]:
    """Q-VLM block partition of n = len(scores) + 1 units from edge scores (Sec. 3.2).

    Edge k (unit k -> k+1) is merged iff scores[k] >= threshold and it is finite and not in `cuts`; merged runs
    longer than max_depth are cut by `split`."""
    PartitionConfig(p=p, threshold=threshold, max_depth=max_depth, split=split)   # validates the knobs
    scores = [float(s) for s in scores]
    n = len(scores) + 1
    thr = threshold_value(scores, p, threshold)
    cuts = set(cuts)
    merged = [math.isfinite(s) and s >= thr and k not in cuts for k, s in enumerate(scores)]
    safe = [s if math.isfinite(s) else -math.inf for s in scores]
    blocks = [b for run in _runs(n, merged) for b in _cap(run, safe, max_depth, split)]
    return check_partition(blocks, n)


def entropy_edge_scores(unit_entropy) -> list[float]:
    """Entropy proxy on edges: score[k] = H(x_q) of unit k+1's input (the layer that receives k's rounding error)."""
    return [float(h) for h in list(unit_entropy)[1:]]


def part_cuts(unit_parts) -> list[int]:
    """Edges k where unit k and unit k+1 lie in different parts (vision | projector | llm)."""
    return [k for k in range(len(unit_parts) - 1) if unit_parts[k] != unit_parts[k + 1]]


# ------------------------------------------------------------------------------------------- baselines
def layerwise(n: int) -> list[list[int]]:
    """Every unit is its own block (layer-wise rounding search, AdaRound)."""
    return [[i] for i in range(n)]


def by_label(labels) -> list[list[int]]:
    """Consecutive units with equal labels form a block, e.g. labels = (part, transformer layer) -> BRECQ blocks."""
    labels = list(labels)
    merged = [labels[k] == labels[k + 1] for k in range(len(labels) - 1)]
    return check_partition(_runs(len(labels), merged), len(labels))


def fixed_size(n: int, size: int, cuts=()) -> list[list[int]]:
    """Blocks of `size` consecutive units, restarting the count at every edge in `cuts`."""
    if size < 1:
        raise QVLMError(f"fixed block size {size} must be >= 1", "pass a positive block size")
    merged = [k not in set(cuts) for k in range(n - 1)]
    return check_partition([b for run in _runs(n, merged) for b in _cap(run, [0.0] * n, size, "greedy")], n)


def whole(n: int, cuts=()) -> list[list[int]]:
    """One block per stage (the joint search over everything the driver can reconstruct at once)."""
    return check_partition(_runs(n, [k not in set(cuts) for k in range(n - 1)]), n)


def baseline(name: str, unit_labels, size: int = 3) -> list[list[int]]:
    """A named baseline over units with labels (part, transformer layer index)."""
    n = len(unit_labels)
    cuts = part_cuts([lab[0] for lab in unit_labels])
    if name == "layerwise":
        return layerwise(n)
    if name == "transformer_blocks":
        return by_label(unit_labels)
    if name == "fixed_size":
        return fixed_size(n, size, cuts)
    if name == "whole":
        return whole(n, cuts)
    raise QVLMError(f"unknown partition baseline {name!r}", f"use one of {', '.join(BASELINES)}")


def summary(blocks: list[list[int]]) -> dict:
    """Block count and depth statistics (what Fig. 3(a) plots against accuracy and search cost)."""
    depths = [len(b) for b in blocks]
    return dict(n_blocks=len(blocks), max_depth=max(depths), mean_depth=sum(depths) / len(depths),
                n_units=sum(depths))


# ------------------------------------------------------------------------------------------- artifacts
@dataclass
class Partition:
    """A chosen partition: blocks of unit indices, the units' linear keys, the scores and the config used."""
    config: dict
    units: list            # [[linear key, ...], ...] forward order
    blocks: list           # [[unit index, ...], ...]
    scores: list           # edge scores the rule saw (len(units) - 1); [] for baselines

    def block_keys(self) -> list[list[str]]:
        """apply(): the linear keys of each block, forward order -- what the rounding search consumes."""
        return [[k for u in b for k in self.units[u]] for b in self.blocks]


def run_partition(units: list[list[str]], unit_parts: list[str], scores, cfg: PartitionConfig,
                  meta: dict | None = None) -> Partition:
    """Search step: Q-VLM partition of `units` from edge `scores`, never merging across parts."""
    blocks = entropy_partition(scores, cfg.p, cfg.max_depth, cfg.threshold, cfg.split, part_cuts(unit_parts))
    return Partition({**asdict(cfg), **(meta or {})}, [list(u) for u in units], blocks, [float(s) for s in scores])


def unit_labels(units: list[list[str]]) -> list[tuple[str, int]]:
    """(part, transformer-layer index) of each unit, from its first linear key ('llm.3.mlp.up_proj' -> ('llm', 3))."""
    return [(u[0].split(".")[0], int(u[0].split(".")[1])) for u in units]


def run_baseline(units: list[list[str]], name: str, size: int = 3) -> Partition:
    """A baseline partition (layerwise | transformer_blocks | fixed_size | whole) as a Partition artifact."""
    blocks = baseline(name, unit_labels(units), size)
    return Partition(dict(baseline=name, size=size), [list(u) for u in units], blocks, [])


def save_partition(part: Partition, path) -> Path:
    """Write `part` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("partition", part, path)


def load_partition(path) -> Partition:
    """Inverse of save_partition."""
    return load_artifact("partition", Partition, path, "qvlm.partition.save_partition")
