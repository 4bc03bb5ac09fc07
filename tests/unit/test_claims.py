"""qvlm.report.claims: each verdict from constructed upstream metrics (including the exact thresholds), and the handling
of missing or mismatched upstream outputs. No notebook runs here: the runner is a stub."""
import json

import pandas as pd
import pytest

from qvlm import reproduce
from qvlm.report import claims as C
from qvlm.errors import QVLMError

R, NR, NM = C.REPRODUCED, C.NOT_REPRODUCED, C.NOT_MEASURABLE


def wrap(metrics, mode="smoke", model="tiny"):
    """A metrics.json as `qvlm.report.save` writes it."""
    return {"config": {"mode": mode, "model": model, "seed": 0}, "metrics": metrics}


def m05(rows):
    """Notebook 05 metrics from (setting, method, accuracy[, cpu_s]) tuples."""
    return wrap({"results": [dict(setting=s, method=m, accuracy=a, cpu_s=(c[0] if c else 1.0), acc_colour=a,
                                  acc_shape=a) for s, m, a, *c in rows]})


def m03(q=(0.9, 500), lw=(0.9, 800), whole=(0.9, 300), brecq=(0.9, 1000)):
    """Notebook 03 partitions as (accuracy, lin_passes)."""
    row = lambda name, a, c, n: dict(name=name, accuracy=a, lin_passes=c, n_blocks=n)  # noqa: E731
    return wrap({"partitions": [row("RTN (no search)", 0.5, None, 0), row(C.LAYERWISE, *lw, 42),
                                row("Q-VLM (p=0.5, depth 3)", *q, 28), row(C.BRECQ, *brecq, 11),
                                row(C.WHOLE, *whole, 3)]})


# ---------------------------------------------------------------------------------------------------- combine
def test_combine_failure_beats_unmeasured_beats_reproduced():
    assert C.combine([(True, "a"), (True, "b")]) == (R, "a; b")
    assert C.combine([(True, "a"), (None, "b")]) == (NM, "b")
    assert C.combine([(None, "a"), (False, "b"), (False, "c")]) == (NR, "b; c")


# ------------------------------------------------------------------------------------------------- accuracy
def test_w4a4_within_two_points_and_above_every_baseline():
    r = C.claim_accuracy(m05([("W4A4", "fp", 0.90), ("W4A4", "rtn", 0.80), ("W4A4", "awq", 0.85),
                              ("W4A4", "qvlm", 0.885)]), "W4A4")
    assert r["verdict"] == R, r


def test_w4a4_drop_too_large_or_tie_with_a_baseline_fails():
    too_far = C.claim_accuracy(m05([("W4A4", "fp", 0.90), ("W4A4", "rtn", 0.80), ("W4A4", "qvlm", 0.87)]), "W4A4")
    assert too_far["verdict"] == NR and "drop 3.0 pts > 2.0 pts" in too_far["why"]
    tie = C.claim_accuracy(m05([("W4A4", "fp", 0.90), ("W4A4", "awq", 0.89), ("W4A4", "qvlm", 0.89)]), "W4A4")
    assert tie["verdict"] == NR and "not above the best baseline (awq)" in tie["why"]     # strictly above


def test_w4a4_without_baselines_is_not_measurable():
    r = C.claim_accuracy(m05([("W4A4", "fp", 0.90), ("W4A4", "qvlm", 0.90)]), "W4A4")
    assert r["verdict"] == NM and "no baseline" in r["why"]


@pytest.mark.parametrize("setting,fp,q,want", [
    ("W8A8", 0.891, 0.886, R),        # exactly 0.5 pt (0.891 - 0.886 = 0.0050000000000000044 in floats) counts
    ("W8A8", 0.891, 0.885, NR),       # 0.6 pt
    ("W6A6", 0.900, 0.890, R),        # exactly 1 pt
    ("W6A6", 0.900, 0.889, NR),
    ("W6A6", 0.900, 0.950, R),        # quantized above FP is within any bound
])
def test_drop_thresholds_are_inclusive(setting, fp, q, want):
    assert C.claim_accuracy(m05([(setting, "fp", fp), (setting, "qvlm", q)]), setting)["verdict"] == want


def test_setting_not_run_upstream_is_not_measurable():
    r = C.claim_accuracy(m05([("W4A4", "fp", 0.9), ("W4A4", "qvlm", 0.9)]), "W6A6")
    assert r["verdict"] == NM and "did not run Q-VLM at W6A6" in r["why"]


# ------------------------------------------------------------------------------------------- other claims
@pytest.mark.parametrize("fp,w4,w8,want", [(0.9, 0.79, 0.89, R), (0.9, 0.85, 0.89, NR), (0.9, 0.7, 0.87, NR),
                                           (0.9, 0.8, 0.88, R)])        # boundaries: exactly 10 and 2 points
def test_testbed_discrimination(fp, w4, w8, want):
    m = wrap({"sensitivity_live": dict(fp=fp, rtn_w4a4=w4, rtn_w8a8=w8, n=1000)})
    assert C.claim_testbed(m)["verdict"] == want


@pytest.mark.parametrize("r2,slope,want", [(0.95, 0.1, R), (0.95, -0.1, NR), (0.5, 0.1, NR), (0.9, 0.1, R)])
def test_entropy_ded_needs_a_strong_positive_fit(r2, slope, want):
    m = wrap({"fixed_layer": dict(r2=r2, slope=slope, intercept=0.0, edge=3),
              "r2_spread": dict(r2_mean=0.3, r2_std=0.1, n_seeds=3)})
    assert C.claim_entropy_ded(m)["verdict"] == want


def test_partition_claim():
    assert C.claim_partition(m03(q=(0.9, 500), lw=(0.9, 800), whole=(0.9, 600)))["verdict"] == R   # tie counts
    assert C.claim_partition(m03(q=(0.8, 500), lw=(0.9, 800), whole=(0.9, 600)))["verdict"] == NR
    r = C.claim_partition(m03(q=(0.95, 500), lw=(0.9, 800), whole=(0.9, 300)))
    assert r["verdict"] == NR and "not below the whole-part" in r["why"]


def test_veo_claim():
    def m(h_after, n_before, n_after, acc_before, acc_after):
        abl = [dict(setting="CDM (absolute threshold)", n_blocks=n_before, accuracy=acc_before),
               dict(setting="CDM + VEO (absolute threshold)", n_blocks=n_after, accuracy=acc_after)]
        return wrap({"llm_entropy": {"FP encoder": 2.0, "after VEO": h_after}, "ablation": abl})
    assert C.claim_veo(m(1.9, 20, 25, 0.9, 0.9))["verdict"] == R
    assert C.claim_veo(m(2.1, 20, 25, 0.9, 0.9))["verdict"] == NR          # entropy went up
    assert C.claim_veo(m(1.9, 20, 20, 0.9, 0.9))["verdict"] == NR          # no finer blocks
    assert C.claim_veo(m(1.9, 20, 25, 0.9, 0.88))["verdict"] == NR         # accuracy loss


def test_search_cost_prefers_05_and_falls_back_to_03():
    five = m05([("W4A4", "qvlm", 0.9, 40.0), ("W4A4", "brecq", 0.9, 100.0)])
    r = C.claim_search_cost(five, m03())
    assert r["verdict"] == R and r["source"] == "05_rounding_search"
    slow = m05([("W4A4", "qvlm", 0.9, 60.0), ("W4A4", "brecq", 0.9, 100.0)])
    assert C.claim_search_cost(slow, m03())["verdict"] == NR
    worse = m05([("W4A4", "qvlm", 0.8, 10.0), ("W4A4", "brecq", 0.9, 100.0)])
    assert C.claim_search_cost(worse, m03())["verdict"] == NR
    r = C.claim_search_cost(m05([("W4A4", "qvlm", 0.9)]), m03(q=(0.9, 500), brecq=(0.9, 1000)))
    assert r["verdict"] == R and r["source"].startswith("03")                # 500 / 1000 = 0.5 exactly


def _m06(model_fraction):
    return wrap({"memory": {"linear": {"ratio": 3.9}, "total": {"ratio_fp16_rest": 2.1}},
                 "accuracy": [dict(scheme="w4a16", packed_acc=0.9), dict(scheme="w4a4", packed_acc=0.85)],
                 "memory_summary": [dict(weights="this model (measured)", w_bits=4, group_size=0,
                                         model_fraction_fp16_rest=0.5),
                                    dict(weights="llava-1.5-7b linears (formula)", w_bits=4, group_size=128,
                                         model_fraction_fp16_rest=model_fraction)]})


def test_memory_claim_uses_the_llava_whole_model_ratio():
    assert C.claim_memory(_m06(0.30))["verdict"] == R                        # 3.33x
    assert C.claim_memory(_m06(0.40))["verdict"] == NR                       # 2.5x


def _gpu_run(speedups, model="llava-13b", method="w4a4_e2e"):
    rows = [dict(model=model, K=k, N=k, M=1, method=method, speedup_vs_fp16=s) for k, s in zip((1, 2, 3), speedups)]
    rows.append(dict(model=model, K=1, N=1, M=600, method=method, speedup_vs_fp16=10.0))   # prefill: ignored
    return {"meta": {"device": "NVIDIA H100", "date": "2030-01-01T00:00:00", "backend": "cuda"}, "rows": rows}


def test_speed_claim():
    assert C.claim_speed([])["verdict"] == NM
    assert C.decode_speedup(_gpu_run([1.0, 2.0, 4.0]))["speedup"] == pytest.approx(2.0)     # geometric mean
    assert C.claim_speed([_gpu_run([1.1, 1.2, 1.3])])["verdict"] == NR       # the upper bound is already too low
    assert C.claim_speed([_gpu_run([2.0, 2.0, 2.0])])["verdict"] == NM       # not timed end to end
    assert C.claim_speed([_gpu_run([2.0] * 3, method="w8a8_e2e")])["verdict"] == NM
    eff = C.efficiency_table(_m06(0.3), [_gpu_run([2.0, 2.0, 2.0])]).set_index("scheme")
    assert eff.loc["w4a4", "decode_speedup"] == pytest.approx(2.0) and eff.loc["w4a4", "linear_mem_ratio"] == 3.9
    assert pd.isna(eff.loc["w4a16", "linear_mem_ratio"])                    # 06 measures memory for its last scheme


# ------------------------------------------------------------------------------------------ missing sources
def test_every_claim_is_not_measurable_without_sources():
    t = C.claims_table({s: None for s in C.UPSTREAM}, [])
    assert (t["verdict"] == NM).all() and len(t) == 10
    assert C.regression(t) == {"n_claims": 10.0, "n_measured_excl_gpu": 0.0}
    assert C.main_accuracy_table(None).empty
    assert C.ablation_table(None, None, None)["accuracy"].isna().all()


def _write(root, stem, mode="smoke", model="tiny"):
    (root / stem).mkdir(parents=True, exist_ok=True)
    (root / stem / "metrics.json").write_text(json.dumps(wrap({}, mode=mode, model=model)))


def test_ensure_upstream_runs_only_the_missing_notebooks(tmp_path):
    for stem in C.UPSTREAM[:5]:
        _write(tmp_path, stem)
    calls = []

    def runner(nb, mode, out_dir, executed, parameters):
        calls.append((nb.stem, mode, out_dir, executed.parent, parameters))
        _write(tmp_path, nb.stem)

    logs = []
    ran = reproduce.ensure_upstream(str(tmp_path), "smoke", parameters={"MODEL": "tiny"}, runner=runner, log=logs.append)
    assert ran == list(C.UPSTREAM[5:]) and [c[0] for c in calls] == ran
    assert all(c[1] == "smoke" and c[2] == tmp_path / c[0] and c[3] == tmp_path / "executed"
               and c[4] == {"MODEL": "tiny"} for c in calls)
    assert len(logs) == 2 and "running notebooks/05_rounding_search.ipynb in smoke mode" in logs[0]
    assert C.missing_upstream(str(tmp_path), "smoke") == []
    assert reproduce.ensure_upstream(str(tmp_path), "smoke", runner=runner) == []      # nothing left to run
    assert len(calls) == 2


def test_default_sources_are_results_mode_dirs():
    assert C.upstream_dir("05_rounding_search", "", "full") == C.RESULTS_DIR / "05_rounding_search" / "full"


def test_load_upstream_refuses_other_modes_and_models(tmp_path):
    _write(tmp_path, "00_testbed")
    up = C.load_upstream(str(tmp_path), "smoke", model="tiny")
    assert up["00_testbed"]["config"]["mode"] == "smoke" and up["05_rounding_search"] is None
    with pytest.raises(QVLMError, match="mode 'smoke', not 'full'"):
        C.load_upstream(str(tmp_path), "full")
    with pytest.raises(QVLMError, match="model 'tiny'"):
        C.load_upstream(str(tmp_path), "smoke", model="/models/llava-1.5-7b-hf")
    assert C.upstream_table("00_testbed", "nothing", str(tmp_path), "smoke") is None


def test_claims_markdown_escapes_pipes():
    t = C.claims_table({s: None for s in C.UPSTREAM}, [])
    md = C.claims_markdown(t.to_dict("records"))
    assert md.count("\n") == len(t) + 1 and "**not measurable here**" in md
    row = dict(claim="a | b", paper="p", ours="o", verdict=R, why="w")
    assert "a \\| b" in C.claims_markdown([row])


def test_readme_shows_the_full_mode_claims_table_or_says_how_to_get_it(tmp_path, monkeypatch):
    from qvlm.report import readme

    monkeypatch.setattr(readme, "RESULTS_DIR", tmp_path)
    assert "run `make reproduce`" in "\n".join(readme.claims_section())
    t = C.claims_table({s: None for s in C.UPSTREAM}, [])
    path = tmp_path / "07_reproduce_paper" / "full" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(wrap({"claims": t.to_dict("records"), "verdict_counts": C.verdict_counts(t)},
                                    mode="full")))
    text = "\n".join(readme.claims_section())
    assert "make reproduce" not in text and "10 not measurable here" in text
    assert text.count("**not measurable here**") == len(t)
