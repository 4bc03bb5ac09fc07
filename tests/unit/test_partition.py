"""qvlm.method.partition: the entropy-guided partition rule and the baselines, as pure functions of a score profile."""
import math

import pytest

from qvlm.method import partition as P
from qvlm.errors import QVLMError


def test_all_high_merges_up_to_max_depth():
    # 7 units, every edge equal -> all >= the quantile -> one run of 7, cut into blocks of <= 3
    assert P.entropy_partition([1.0] * 6, p=0.5, max_depth=3, split="greedy") == [[0, 1, 2], [3, 4, 5], [6]]
    blocks = P.entropy_partition([1.0] * 6, p=0.5, max_depth=3, split="weakest")
    assert max(len(b) for b in blocks) <= 3 and P.check_partition(blocks, 7)


def test_all_low_absolute_is_layerwise():
    assert P.entropy_partition([0.1] * 4, p=1.0, threshold="absolute") == P.layerwise(5)


def test_threshold_edges():
    s = [0.2, 0.9, 0.5, 0.9]
    # p = 0: threshold = min -> every edge merges (capped at max depth)
    assert P.entropy_partition(s, p=0.0, max_depth=5) == [[0, 1, 2, 3, 4]]
    # p = 1: threshold = max -> only the maximal edges merge (at-or-above)
    assert P.entropy_partition(s, p=1.0, max_depth=5) == [[0], [1, 2], [3, 4]]
    # absolute threshold exactly at a score merges it; just above does not
    assert P.entropy_partition(s, p=0.5, threshold="absolute", max_depth=5) == [[0], [1, 2, 3, 4]]
    assert P.entropy_partition(s, p=0.5 + 1e-9, threshold="absolute", max_depth=5) == [[0], [1, 2], [3, 4]]


def test_max_depth_edges():
    s = [1.0, 1.0, 1.0]
    assert P.entropy_partition(s, p=0.0, max_depth=1) == P.layerwise(4)
    assert P.entropy_partition(s, p=0.0, max_depth=4) == [[0, 1, 2, 3]]
    assert P.entropy_partition(s, p=0.0, max_depth=100) == [[0, 1, 2, 3]]
    with pytest.raises(QVLMError):
        P.entropy_partition(s, max_depth=0)


def test_weakest_split_keeps_strong_pairs():
    # run of 4 units with edges 0.9, 0.5, 0.9: weakest cut keeps (0,1) and (2,3); greedy gives (0,1,2), (3)
    s = [0.9, 0.5, 0.9]
    assert P.entropy_partition(s, p=0.0, max_depth=2, split="weakest") == [[0, 1], [2, 3]]
    assert P.entropy_partition(s, p=0.0, max_depth=3, split="greedy") == [[0, 1, 2], [3]]
    assert P.entropy_partition(s, p=0.0, max_depth=3, split="weakest") == [[0, 1], [2, 3]]


def test_nan_and_cuts_never_merge():
    s = [1.0, math.nan, 1.0, 1.0]
    assert P.entropy_partition(s, p=0.0, max_depth=9) == [[0, 1], [2, 3, 4]]
    assert P.entropy_partition(s, p=0.0, max_depth=9, cuts=[2]) == [[0, 1], [2], [3, 4]]
    assert P.entropy_partition([math.nan] * 3, p=0.5) == P.layerwise(4)     # nothing measurable


def test_single_unit_and_bad_knobs():
    assert P.entropy_partition([], p=0.5) == [[0]]
    with pytest.raises(QVLMError):
        P.entropy_partition([1.0], p=1.5)
    with pytest.raises(QVLMError):
        P.entropy_partition([1.0], threshold="mean")
    with pytest.raises(QVLMError):
        P.entropy_partition([1.0], split="dp")


def test_entropy_edge_scores_and_part_cuts():
    assert P.entropy_edge_scores([1.0, 2.0, 3.0]) == [2.0, 3.0]
    assert P.part_cuts(["vision", "vision", "projector", "llm", "llm"]) == [1, 2]


LABELS = [("vision", 0)] * 2 + [("vision", 1)] * 2 + [("projector", 0)] * 2 + [("llm", 0)] * 3


def test_baselines():
    n = len(LABELS)
    assert P.baseline("layerwise", LABELS) == P.layerwise(n)
    assert P.baseline("transformer_blocks", LABELS) == [[0, 1], [2, 3], [4, 5], [6, 7, 8]]
    assert P.baseline("fixed_size", LABELS, size=3) == [[0, 1, 2], [3], [4, 5], [6, 7, 8]]
    assert P.baseline("whole", LABELS) == [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    with pytest.raises(QVLMError):
        P.baseline("random", LABELS)
    assert P.summary([[0, 1, 2], [3]]) == dict(n_blocks=2, max_depth=3, mean_depth=2.0, n_units=4)


def test_run_save_load_apply(tmp_path):
    units = [["v.q", "v.k"], ["v.o"], ["p.l1"], ["l.q"], ["l.o"]]
    parts = ["vision", "vision", "projector", "llm", "llm"]
    part = P.run_partition(units, parts, [5.0, 5.0, 5.0, 5.0], P.PartitionConfig(p=0.0, max_depth=3))
    assert part.blocks == [[0, 1], [2], [3, 4]]                   # parts are never merged
    assert part.block_keys() == [["v.q", "v.k", "v.o"], ["p.l1"], ["l.q", "l.o"]]
    back = P.load_partition(P.save_partition(part, tmp_path / "p.pt"))
    assert back == part and back.config["max_depth"] == 3


def test_run_baseline_from_unit_keys():
    units = [["vision.0.q", "vision.0.k"], ["vision.0.o"], ["vision.1.q"], ["projector.0.l1"], ["llm.0.q"]]
    assert P.unit_labels(units)[0] == ("vision", 0)
    part = P.run_baseline(units, "transformer_blocks")
    assert part.blocks == [[0, 1], [2], [3], [4]] and part.config["baseline"] == "transformer_blocks"
    assert P.run_baseline(units, "whole").blocks == [[0, 1, 2], [3], [4]]
