"""Regenerate the README's results section from measured files: `python -m qvlm.report.readme`.

Sources (each written by a command; nothing here is typed in by hand):
    data/tiny/testbed.json       python -m qvlm.testbed.train && python -m qvlm.testbed.sensitivity
    results/bench/accuracy.json  python -m bench.accuracy
    results/metrics.json         make reproduce (every notebook in full mode)
    results/07_reproduce_paper/full/metrics.json   make reproduce (notebook 07: the paper's claims, with verdicts)
The block between `<!-- results:start -->` and `<!-- results:end -->` in README.md is replaced (atomically).
"""
from __future__ import annotations

import json
import re
import sys

from ..paths import REPO_ROOT, RESULTS_DIR, TINY_DIR
from ..utils import atomic_write_text
from .claims import claims_markdown, main_accuracy_table

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _train_minutes(rec: dict) -> float:
    """Training time of a checkpoint and of every run it continued from (`previous` chain)."""
    total = 0.0
    while rec:
        total += rec.get("train_seconds", 0.0)
        rec = rec.get("previous")
    return total / 60


def testbed_section() -> list[str]:
    path = TINY_DIR / "testbed.json"
    if not path.exists():
        return ["*No testbed record: run `python -m qvlm.testbed.train`.*", ""]
    rec = json.loads(path.read_text())
    fp = rec["fp_test"]
    cats = sorted(fp["per_category"])
    sens = rec.get("sensitivity", {})
    out = ["### The testbed (`data/tiny/testbed.json`)", "",
           f"{rec['n_params'] / 1e6:.2f} M parameters, trained in {_train_minutes(rec):.0f} min on 2 CPU cores"
           + (" (staged recipe plus a continued stage 3, see `previous`)" if rec.get("init") else "")
           + f"; test n = {fp['n']}, chance {_pct(rec['chance_test'])} %.", "",
           "| model | overall | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats),
           "| FP | " + _pct(fp["accuracy"]) + " | " + " | ".join(_pct(fp["per_category"][c]) for c in cats) + " |", ""]
    if rec.get("outliers"):
        o = rec["outliers"]
        out += [f"Outlier channels (`python -m qvlm.testbed.outliers`, FP-preserving): the largest-gain "
                f"{o['frac']:.3g} of the channels of each of {len(o['norms'])} norms x{o['scale']:g}, the scale chosen "
                "on the val split (see `data/README.md`).", ""]
    if sens:
        out += ["Naive RTN (per-channel weights, per-token activations, vision + projector + LLM; "
                "`python -m qvlm.testbed.sensitivity`):", "",
                "| FP | RTN W8A8 | RTN W4A4 |", "|---|---|---|",
                f"| {_pct(sens['fp'])} | {_pct(sens['rtn_w8a8'])} | {_pct(sens['rtn_w4a4'])} |", ""]
    return out


def claims_section() -> list[str]:
    """The paper's claims with our full-mode numbers and verdicts (notebook 07), or how to produce them."""

    path = RESULTS_DIR / "07_reproduce_paper" / "full" / "metrics.json"
    head = "### The paper's claims on the testbed (`notebooks/07_reproduce_paper.ipynb`, full mode)"
    if not path.exists():
        return [head, "", "*No full-mode claims table yet: run `make reproduce` (writes "
                "`results/07_reproduce_paper/full/metrics.json`), then `python -m qvlm.report.readme`.*", ""]
    m = json.loads(path.read_text())
    counts = m["metrics"].get("verdict_counts", {})
    return [head, "", f"Model `{m['config']['model']}`; " + ", ".join(f"{n} {v}" for v, n in counts.items())
            + f". Thresholds: `qvlm/claims.py`. Sources: `results/<notebook>/full/`.", "",
            claims_markdown(m["metrics"]["claims"]), ""]


def _markdown(df) -> str:
    """A small DataFrame (index included) as a markdown table, numbers to one decimal."""
    d = df.reset_index()
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)         # noqa: E731
    return "\n".join(["| " + " | ".join(map(str, d.columns)) + " |", "|" + "---|" * len(d.columns)]
                     + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in d.itertuples(index=False)])


def main_table_section() -> list[str]:
    """The main accuracy table (methods x settings x categories, %) from results/metrics.json (notebook 05, full)."""

    path = RESULTS_DIR / "metrics.json"
    head = "### Main table: every method x setting on the testbed test split, % (`results/metrics.json`, notebook 05)"
    m05 = json.loads(path.read_text()).get("05_rounding_search") if path.exists() else None
    table = main_accuracy_table({"metrics": m05}) if m05 else None
    if table is None or table.empty:
        return [head, "", "*Not measured yet: run `make reproduce`, then `python -m qvlm.report.readme`.*", ""]
    return [head, "", _markdown(table), ""]


def bench_section() -> list[str]:
    path = RESULTS_DIR / "bench" / "accuracy.md"
    if not path.exists():
        return ["*No accuracy benchmark stored yet: `python -m bench.accuracy` writes `results/bench/accuracy.md`.*", ""]
    return ["### Every method × bit-width on the testbed (`python -m bench.accuracy`)", "",
            "Same harness as the main table, other settings: `CalibConfig` defaults (calibration batch 16) and each "
            "method's default step count, where notebook 05 uses batch 32 and 200 steps; at W4A4 the collapsing "
            "methods (RTN-like GPTQ, AdaRound) move by a few points with such changes.", "",
            path.read_text().strip(), ""]


def render() -> str:
    lines = [START, "## Results", "",
             "Generated by `python -m qvlm.report.readme` from the files named in each heading; every number comes from "
             "the command given there.", ""]
    lines += claims_section() + main_table_section() + testbed_section() + bench_section()
    return "\n".join(lines + [END])


def main() -> int:
    readme = REPO_ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print("README.md lacks the results markers", file=sys.stderr)
        return 2
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: render(), text, flags=re.S)
    atomic_write_text(readme, new)
    print("README results section regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
