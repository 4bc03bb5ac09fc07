"""bench/accuracy.py end to end on tiny (a few samples): the table names the command that made it, ranks only with
non-overlapping intervals, and bad input is one line with exit status 2."""
import json

from bench import accuracy, veo


def test_bench_table_names_its_command_and_orders_by_intervals(tmp_path, capsys):
    argv = ["--model", "tiny", "--methods", "rtn,rtn+fold", "--settings", "W4A4", "--seeds", "0,1",
            "--limit", "24", "--out", str(tmp_path), "--no-progress"]
    assert accuracy.main(argv) == 0
    md = (tmp_path / "accuracy.md").read_text()
    assert md.startswith("`python -m bench.accuracy --model tiny --methods rtn,rtn+fold")
    res = json.loads((tmp_path / "accuracy.json").read_text())
    assert res["seeds"] == [0, 1] and res["n_eval"] == 24 and len(res["rows"]) == 4
    assert f"Code: commit {res['code']['git_commit'][:10]}" in md and len(res["code"]["code_hash"]) == 64
    for st in ("W4A4",):                       # data-free rows: std 0, so an ordering is > / < unless equal
        line = next(l for l in md.splitlines() if l.startswith(f"- {st}: "))
        assert any(f" {v} " in line for v in (">", "<", "tied"))


def test_bench_method_options_are_flags_and_reach_the_runs(tmp_path):
    """Every option of the chosen methods is a generated flag (as in `qvlm run`); given ones reach each run's knobs,
    override the preset's (iters) and are named in the table's header."""
    argv = ["--model", "tiny", "--methods", "adaround", "--settings", "W8A8", "--seeds", "0", "--mode", "smoke",
            "--budget", "0", "--limit", "8", "--iters", "1", "--warmup", "0.5", "--out", str(tmp_path), "--no-progress"]
    assert accuracy.main(argv) == 0
    res = json.loads((tmp_path / "accuracy.json").read_text())
    assert res["knobs"] == {"iters": 1, "warmup": 0.5}
    assert [(r["knobs"]["iters"], r["knobs"]["warmup"]) for r in res["rows"]] == [(1, 0.5)]
    assert "method options iters=1, warmup=0.5" in (tmp_path / "accuracy.md").read_text()


def test_bench_default_table_drops_learned_searches_at_deployment_settings_on_cpu(tmp_path):
    """Without --settings the table is qvlm.experiments.TABLE_SETTINGS; the cpu preset runs a learned search only at
    the core settings and the table says which cells it left out."""
    argv = ["--model", "tiny", "--methods", "rtn,adaround", "--seeds", "0", "--mode", "smoke", "--budget", "0",
            "--limit", "8", "--iters", "1", "--out", str(tmp_path), "--no-progress"]
    assert accuracy.main(argv) == 0
    res = json.loads((tmp_path / "accuracy.json").read_text())
    assert res["settings"] == ["W8A8", "W6A6", "W4A8", "W4A4", "W4A16"]
    assert res["dropped"] == ["adaround W4A8", "adaround W4A16"]
    assert sorted((r["method"], r["setting"]) for r in res["rows"] if r["method"] == "adaround") == [
        ("adaround", "W4A4"), ("adaround", "W6A6"), ("adaround", "W8A8")]
    assert "–: not run. The cpu preset runs the learned searches" in (tmp_path / "accuracy.md").read_text()


def test_bench_bad_method_is_one_line(tmp_path, capsys):
    assert accuracy.main(["--model", "tiny", "--methods", "nope", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err
    assert not (tmp_path / "accuracy.md").exists()


def test_veo_sweep_picks_on_the_guard_then_entropy_and_errors_are_one_line(tmp_path, capsys):
    row = lambda eta, lr, seed, change, reverted: dict(                  # noqa: E731
        eta=eta, lr=lr, seed=seed, H_before=2.0, H_after=2.0 * (1 + change), H_change=change, crest_before=1.0,
        crest_after=1.1, kl_after=0.1, fp_val_before=0.8, fp_val_after=0.7 if reverted else 0.8, reverted=reverted,
        cpu_s=1.0)
    res = dict(rows=[row(1, 1e-3, s, -0.10, s == 1) for s in range(3)] + [row(3, 1e-4, s, -0.02, False)
                                                                             for s in range(3)])
    table = veo.settings_table(res)
    assert [t["n_reverted"] for t in table] == [1, 0]
    best = veo.pick(table)                                  # the larger drop is reverted once: not usable
    assert (best["eta"], best["lr"]) == (3, 1e-4) and abs(best["H_change"][0] + 2.0) < 1e-9
    assert veo.pick([t for t in table if t["n_reverted"]]) is None
    head = dict(model="tiny", setting="W4A4", encoder_params="layernorm", veo_iters=2, n_calib=4, seeds=[0, 1, 2],
                eta_mode="relative", n_guard=8, guard=0.003, torch="x", threads=1)
    md = veo.to_markdown(dict(head, rows=res["rows"] + [row(10, 1e-4, 0, -0.05, False)]))
    assert "| ar | 3 | 0.0001 | -2.0 ± 0.0 |" in md and "| ar | 10 | 0.0001 | -5.0 |" in md  # one seed: no std
    assert "picked on val: anchor ar, eta 10, lr 0.0001 (entropy -5.0 %)" in md
    kl = [dict(row(3, 1e-4, s, -0.06, False), anchor="kl") for s in range(3)]      # same (eta, lr), other anchor
    table = veo.settings_table(dict(rows=res["rows"] + kl))
    assert [(t["anchor"], t["eta"], t["n"]) for t in table] == [("ar", 1, 3), ("ar", 3, 3), ("kl", 3, 3)]
    assert veo.pick(table)["anchor"] == "kl"
    n, r = veo.frontier_r(res["rows"] + kl)                 # bigger drops were the reverted (lower FP val) ones
    assert n == 9 and 0 < r <= 1 and veo.frontier_r(kl) is None        # no FP-val spread: no r
    for bad in (["--etas", "one"], ["--anchors", "ce"], ["--with", str(tmp_path / "nowhere")]):
        assert veo.main(["--model", "tiny", *bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and bad[0] in err and not (tmp_path / "veo.md").exists()


def test_veo_resume_needs_an_earlier_sweep(tmp_path, capsys):
    assert veo.main(["--model", "tiny", "--resume", "--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err and not (tmp_path / "veo.md").exists()
