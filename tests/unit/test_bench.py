"""bench/accuracy.py end to end on tiny (a few samples): the table names the command that made it, ranks only with
non-overlapping intervals, and bad input is one line with exit status 2."""
import json

from bench import accuracy


def test_bench_table_names_its_command_and_orders_by_intervals(tmp_path, capsys):
    argv = ["--model", "tiny", "--methods", "rtn,rtn+fold", "--settings", "W4A4", "--seeds", "0,1",
            "--limit", "24", "--out", str(tmp_path), "--no-progress"]
    assert accuracy.main(argv) == 0
    md = (tmp_path / "accuracy.md").read_text()
    assert md.startswith("`python -m bench.accuracy --model tiny --methods rtn,rtn+fold")
    res = json.loads((tmp_path / "accuracy.json").read_text())
    assert res["seeds"] == [0, 1] and res["n_eval"] == 24 and len(res["rows"]) == 4
    for st in ("W4A4",):                       # data-free rows: std 0, so an ordering is > / < unless equal
        line = next(l for l in md.splitlines() if l.startswith(f"- {st}: "))
        assert any(f" {v} " in line for v in (">", "<", "tied"))


def test_bench_bad_method_is_one_line(tmp_path, capsys):
    assert accuracy.main(["--model", "tiny", "--methods", "nope", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err
    assert not (tmp_path / "accuracy.md").exists()
