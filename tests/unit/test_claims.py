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


def summary(rows):
    """qvlm.report.stats.summarize records from (setting, variant, mean, std[, cpu_s]) tuples."""
    return [dict(setting=st, variant=v, accuracy_mean=m, accuracy_std=sd, cpu_s_mean=(c[0] if c else 1.0),
                 cpu_s_std=0.0) for st, v, m, sd, *c in rows]


def m05(rows, fp=0.90):
    return {"summary": summary(rows), "fp_accuracy": fp}


# ---------------------------------------------------------------------------------------------------- combine
def test_combine_failure_beats_unmeasured_beats_reproduced():
    assert C.combine([(True, "a"), (True, "b")]) == (R, "a; b")
    assert C.combine([(True, "a"), (None, "b")]) == (NM, "b")
    assert C.combine([(None, "a"), (False, "b"), (False, "c")]) == (NR, "b; c")


# ------------------------------------------------------------------------------------------------- accuracy
def test_w4a4_within_two_points_and_above_every_baseline():
    r = C.claim_accuracy(m05([("W4A4", "rtn", 0.80, 0.01), ("W4A4", "awq", 0.85, 0.005),
                              ("W4A4", "qvlm", 0.885, 0.005)]), "W4A4")
    assert r["verdict"] == R, r


def test_w4a4_drop_too_large_or_tie_with_a_baseline_fails():
    too_far = C.claim_accuracy(m05([("W4A4", "rtn", 0.80, 0.0), ("W4A4", "qvlm", 0.87, 0.0)]), "W4A4")
    assert too_far["verdict"] == NR and "drop 3.0 pts" in too_far["why"]
    tie = C.claim_accuracy(m05([("W4A4", "awq", 0.885, 0.01), ("W4A4", "qvlm", 0.89, 0.01)]), "W4A4")
    assert tie["verdict"] == NR and "not above awq" in tie["why"]            # overlapping intervals: tied


def test_w4a4_without_baselines_is_not_measurable():
    r = C.claim_accuracy(m05([("W4A4", "qvlm", 0.90, 0.0)]), "W4A4")
    assert r["verdict"] == NM and "no baseline" in r["why"]
    assert C.claim_accuracy(None, "W4A4")["verdict"] == NM


def test_a_setting_without_a_target_is_refused_by_name():
    with pytest.raises(ValueError, match="no accuracy target for W4A8"):
        C.claim_accuracy(m05([("W4A8", "qvlm", 0.90, 0.0)]), "W4A8")


@pytest.mark.parametrize("setting,fp,q,want", [
    ("W8A8", 0.891, 0.886, R), ("W8A8", 0.891, 0.885, NR), ("W6A6", 0.90, 0.89, R), ("W6A6", 0.90, 0.889, NR),
    ("W6A6", 0.90, 0.95, R)])
def test_drop_thresholds_are_inclusive(setting, fp, q, want):
    assert C.claim_accuracy(m05([(setting, "qvlm", q, 0.0)], fp=fp), setting)["verdict"] == want


def sens(fp, w4, w4f, w8, n=1000):
    return {"sensitivity": dict(fp=fp, rtn_w4a4=w4, rtn_w4a4_fold=w4f, rtn_w8a8=w8, n=n)}


@pytest.mark.parametrize("fp,w4,w4f,w8,want", [
    (0.90, 0.79, 0.80, 0.89, R),           # both drops >= 10 points, W8A8 within 1
    (0.90, 0.70, 0.85, 0.89, NR),          # the fold undoes the difficulty (an invertible artefact)
    (0.90, 0.70, 0.70, 0.885, NR),         # W8A8 drop 1.5 points
    (0.75, 0.50, 0.50, 0.75, NR),          # FP below 80 %
])
def test_testbed_discrimination(fp, w4, w4f, w8, want):
    assert C.claim_testbed(sens(fp, w4, w4f, w8))["verdict"] == want
    assert C.claim_testbed({})["verdict"] == NM


def m02(r2, slope):
    fit = dict(r2=0.3, slope=0.1)
    return {"fixed_layer": dict(r2=r2, slope=slope), "fits": {"H_pooled": fit, "D_pooled": fit}}


@pytest.mark.parametrize("r2,slope,want", [(0.95, 0.1, R), (0.95, -0.1, NR), (0.5, 0.1, NR), (0.9, 0.1, R)])
def test_entropy_ded_needs_a_strong_positive_fit(r2, slope, want):
    assert C.claim_entropy_ded(m02(r2, slope))["verdict"] == want


def partitions(q):
    rows = summary([(None, C.QVLM_PARTITION, q, 0.005), (None, C.LAYERWISE, 0.85, 0.005), (None, C.WHOLE, 0.86, 0.005)])
    for x, c in zip(rows, (500, 800, 900)):
        x.update(linear_passes_mean=c, linear_passes_std=0.0)
    return rows


def test_partition_claim():
    assert C.claim_partition({"partitions_steps": partitions(0.9), "partitions_budget": partitions(0.9)})["verdict"] == R
    assert C.claim_partition({"partitions_steps": partitions(0.8), "partitions_budget": partitions(0.8)})["verdict"] == NR
    assert C.claim_partition({"partitions_steps": partitions(0.9)})["verdict"] == NM        # budget mode not run


def test_partition_claim_at_equal_compute_compares_cost_with_layerwise():
    m = {"partitions_steps": partitions(0.9), "partitions_budget": partitions(0.9), "budget_unit": "compute"}
    assert C.claim_partition(m)["verdict"] == R                       # 500 passes vs layer-wise 800
    dear = partitions(0.9)
    dear[0].update(linear_passes_mean=800 * (1 + C.COMPUTE_TOL) + 1)  # Q-VLM row above layer-wise's compute
    assert C.claim_partition(dict(m, partitions_budget=dear))["verdict"] == NR
    assert C.claim_partition(dict(m, budget_unit="steps", partitions_budget=dear))["verdict"] == R   # vs whole: 841 < 900


def test_budget_spent():
    rows = [dict(variant=C.LAYERWISE, seed=s, steps=40, linear_passes=1000) for s in (0, 1)]
    rows += [dict(variant=C.QVLM_PARTITION, seed=s, steps=30, linear_passes=1000 + 30 * s) for s in (0, 1)]
    assert C.budget_spent(rows, 40, "compute") and not C.budget_spent(rows, 40, "steps")
    assert C.budget_spent(rows[:2], 40, "steps")
    rows[-1]["linear_passes"] = 1000 * (1 + C.COMPUTE_TOL) + 1
    assert not C.budget_spent(rows, 40, "compute")
    assert not C.budget_spent(rows[2:], 40, "compute")                # no layer-wise reference row


def m04(hb, ha, fp_before=0.9, fp_after=0.9, acc=(0.85, 0.86), blocks=(10, 12)):
    abl = summary([(None, C.CDM, acc[0], 0.002), (None, C.CDM_VEO, acc[1], 0.002)])
    for x, b in zip(abl, blocks):
        x.update(n_blocks_mean=b, n_blocks_std=0.0)
    return {"veo": dict(tokens="image", H_image_before=hb, H_image_after=ha, fp_val_before=fp_before,
                        fp_val_after=fp_after), "ablation": abl}


def test_veo_claim():
    assert C.claim_veo(m04(1.0, 0.9))["verdict"] == R
    assert C.claim_veo(m04(1.0, 0.99))["verdict"] == NR                         # entropy -1 %: short of -5 %
    assert C.claim_veo(m04(1.0, 0.9, fp_after=0.89))["verdict"] == NR           # FP cost 1 point
    assert C.claim_veo(m04(1.0, 0.9, blocks=(10, 10)))["verdict"] == NR         # no finer blocks
    assert C.claim_veo(None)["verdict"] == NM


def test_search_cost_at_equal_budget():
    ok = m05([(s, v, 0.85, 0.005, c) for s in ("W4A4", "W6A6") for v, c in (("qvlm", 10.0), ("brecq", 20.0))])
    assert C.claim_budget(ok)["verdict"] == R
    slow = m05([(s, v, 0.85, 0.005, c) for s in ("W4A4", "W6A6") for v, c in (("qvlm", 30.0), ("brecq", 20.0))])
    assert C.claim_budget(slow)["verdict"] == NR
    assert C.claim_budget(None)["verdict"] == NM


def _m06(ratio):
    return {"memory_reference": {"llava-1.5-13b": dict(model_ratio=ratio, linear_ratio=3.9)}}


def test_memory_claim_uses_the_llava_whole_model_ratio():
    assert C.claim_memory(_m06(3.33))["verdict"] == R
    assert C.claim_memory(_m06(2.5))["verdict"] == NR
    assert C.claim_memory(None)["verdict"] == NM


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


# ------------------------------------------------------------------------------------------ missing sources
def test_every_claim_is_not_measurable_without_sources():
    t = C.claims_table({s: None for s in C.UPSTREAM}, [])
    assert (t["verdict"] == NM).all() and len(t) == 12
    assert C.regression(t) == {"n_claims": 12.0, "n_measured_excl_gpu": 0.0}


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


def test_full_mode_reads_a_published_copy_when_there_is_no_local_run(tmp_path, monkeypatch):
    """A fresh clone has only results/published/metrics/<stem>.json: full mode reads those (a local run wins), tables
    come from the records of the same name inside them; smoke mode and explicit SOURCES never fall back."""
    results, pub = tmp_path / "results", tmp_path / "published"
    monkeypatch.setattr(C, "RESULTS_DIR", results)
    monkeypatch.setattr(C, "PUBLISHED", pub)
    (pub / "metrics").mkdir(parents=True)
    published = {"config": {"mode": "full", "model": "smol"}, "metrics": {"eta_sweep": [{"eta": 1.0, "acc": 0.4}]}}
    (pub / "metrics" / "04_encoder_disentangling.json").write_text(json.dumps(published))
    assert "04_encoder_disentangling" not in C.missing_upstream("", "full")
    assert "04_encoder_disentangling" in C.missing_upstream("", "smoke")
    assert "04_encoder_disentangling" in C.missing_upstream(str(tmp_path / "elsewhere"), "full")
    up = C.load_upstream("", "full", model="smol")
    assert up["04_encoder_disentangling"]["source"].endswith("published/metrics/04_encoder_disentangling.json")
    assert C.upstream_table("04_encoder_disentangling", "eta_sweep").to_dict("records") == [{"eta": 1.0, "acc": 0.4}]
    assert C.upstream_table("04_encoder_disentangling", "nothing") is None
    own = results / "04_encoder_disentangling" / "full"
    own.mkdir(parents=True)
    (own / "metrics.json").write_text(json.dumps({"config": {"mode": "full", "model": "smol"}, "metrics": {}}))
    assert C.load_upstream("", "full")["04_encoder_disentangling"]["metrics"] == {}         # the local run wins
    assert C.provenance(C.load_upstream("", "full")).set_index("notebook").loc["04_encoder_disentangling", "source"] \
        == str(own / "metrics.json")


def test_claims_markdown_escapes_pipes():
    t = C.claims_table({s: None for s in C.UPSTREAM}, [])
    md = C.claims_markdown(t.to_dict("records"))
    assert md.count("\n") == len(t) + 1 and "**not measurable here**" in md
    row = dict(claim="a | b", paper="p", ours="o", verdict=R, why="w")
    assert "a \\| b" in C.claims_markdown([row])


def test_readme_shows_the_full_mode_claims_table_or_says_how_to_get_it(tmp_path, monkeypatch):
    from qvlm.report import readme

    monkeypatch.setattr(readme, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(readme, "PUBLISHED", tmp_path / "published")
    assert "run `make reproduce`" in "\n".join(readme.claims_section())
    t = C.claims_table({s: None for s in C.UPSTREAM}, [])
    path = tmp_path / "07_reproduce_paper" / "full" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(wrap({"claims": t.to_dict("records"), "verdict_counts": C.verdict_counts(t)},
                                    mode="full")))
    text = "\n".join(readme.claims_section())
    assert "make reproduce" not in text and f"{len(t)} not measurable here" in text
    assert text.count("**not measurable here**") == len(t)


def test_beyond_the_paper_needs_the_top_row_at_w4a4_and_w6a6():
    rows = lambda q, b: m05([(s, v, m, 0.005) for s in ("W4A4", "W6A6")                      # noqa: E731
                             for v, m in (("brecq", b), ("quarot", 0.80), ("qvlm", 0.79), ("qvlm+rotate", q))])
    top = C.claim_beyond(rows(0.86, 0.84))
    assert top["verdict"] == R and "drop 4.0 pts" in top["ours"], top
    tie = C.claim_beyond(rows(0.85, 0.845))
    assert tie["verdict"] == NR and "not above brecq" in tie["why"]
    wide = m05([("W4A4", "qvlm+rotate", 0.86, 0.005), ("W4A4", "brecq", 0.85, 0.001), ("W4A4", "awq", 0.80, 0.08)])
    assert "not above awq" in C.claim_beyond(wide)["why"]                  # the widest interval counts, not the mean
    assert C.claim_beyond(m05([("W4A4", "qvlm", 0.8, 0.0)]))["verdict"] == NM
    assert C.claim_beyond(None)["verdict"] == NM
