"""Regenerate the README's results section from measured files: `python -m qvlm.report.readme`.

Sources (each written by a command; nothing here is typed in by hand):
    data/smol/testbed.json, data/tiny/testbed.json   python -m qvlm.testbed.smol record / qvlm.testbed.sensitivity
    results/published/                               make reproduce (executed notebooks, figures, each run's
                                                     metrics.json under metrics/ and its seconds in the manifest:
                                                     committed, so the README regenerates from a fresh clone)
    results/NN_name/full/metrics.json, results/seconds.json   this machine's last full runs (where nothing is published)
    results/published/bench/*/accuracy.md            python -m bench.accuracy --out results/published/bench/NAME
    results/published/bench/*/veo.md                 python -m bench.veo --out results/published/bench/NAME
    tests/reference/smoke_seconds.json               make update-reference (each notebook's smoke run, timed)
The block between `<!-- results:start -->` and `<!-- results:end -->` in README.md is replaced (atomically).
"""
from __future__ import annotations

import json
import re
import sys

from ..paths import REPO_ROOT, RESULTS_DIR
from ..utils import atomic_write_text
from .claims import claims_markdown
from .publish import PUBLISHED, published_metrics
from .stats import pm

START, END = "<!-- results:start -->", "<!-- results:end -->"
KEY_FIGURES = ("00_testbed-outliers", "01_activation_entropy-layer_entropy", "02_cross_layer_dependency-entropy_vs_ded",
               "03_block_partitioning-partition", "03_block_partitioning-accuracy_vs_cost_budget",
               "04_encoder_disentangling-eta_sweep", "05_rounding_search-accuracy_by_method")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _json(path):
    return json.loads(path.read_text()) if path.exists() else None


def testbed_section(name: str) -> list[str]:
    rec = _json(REPO_ROOT / "data" / name / "testbed.json")
    if not rec or "fp_test" not in rec:
        return [f"*No `{name}` record yet (`python -m qvlm.testbed.{name} record`): see data/{name}/README.md.*", ""]
    fp, sens = rec["fp_test"], rec.get("sensitivity", {})
    cats = sorted(fp["per_category"])
    out = [f"### `{name}` (`data/{name}/testbed.json`)", "",
           "| model | overall | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats),
           "| FP | " + _pct(fp["accuracy"]) + " | " + " | ".join(_pct(fp["per_category"][c]) for c in cats) + " |", ""]
    if sens:
        out += [f"Naive RTN on test (n = {sens['n']}; per-channel symmetric weights, per-token activations, vision + "
                "projector + LLM), plain, with the norm gains folded into the reading linears, and after the "
                "seeded QuaRot rotation (`--transform rotate`, seed 0):", "",
                "| FP | RTN W8A8 | RTN W4A4 | RTN W8A8, folded | RTN W4A4, folded | RTN W8A8, rotated | "
                "RTN W4A4, rotated |", "|---|---|---|---|---|---|---|",
                f"| {_pct(sens['fp'])} | {_pct(sens['rtn_w8a8'])} | {_pct(sens['rtn_w4a4'])} | "
                f"{_pct(sens.get('rtn_w8a8_fold'))} | {_pct(sens.get('rtn_w4a4_fold'))} | "
                f"{_pct(sens.get('rtn_w8a8_rotate'))} | {_pct(sens.get('rtn_w4a4_rotate'))} |", ""]
    return out


def notebook_metrics(stem: str) -> dict | None:
    """A notebook's full-mode metrics.json: the published copy (committed), else this machine's last full run."""
    return published_metrics(stem, PUBLISHED) or _json(RESULTS_DIR / stem / "full" / "metrics.json")


def claims_section() -> list[str]:
    m = notebook_metrics("07_reproduce_paper")
    head = "### The paper's claims (`notebooks/07_reproduce_paper.ipynb`, full mode)"
    if not m:
        return [head, "", "*No full-mode claims table yet: run `make reproduce`, then `python -m qvlm.report.readme`.*", ""]
    counts = m["metrics"].get("verdict_counts", {})
    return [head, "", f"Model `{m['config']['model']}`, preset `{m['config'].get('preset')}`; "
            + ", ".join(f"{n} {v}" for v, n in counts.items())
            + ". Thresholds and verdict rules: `qvlm/report/claims.py`.", "", claims_markdown(m["metrics"]["claims"]), ""]


def main_table_section() -> list[str]:
    m = (notebook_metrics("05_rounding_search") or {}).get("metrics")
    head = "### Main table: accuracy %, mean ± std over calibration seeds (notebook 05, full mode)"
    if not m or not m.get("summary"):
        return [head, "", "*Not measured yet: run `make reproduce`.*", ""]
    rows = m["summary"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["setting"]): r for r in rows}
    lines = [f"FP {_pct(m['fp_accuracy'])} %.", "", "| method | " + " | ".join(settings) + " | W4A4 CPU s |",
             "|---|" + "---|" * (len(settings) + 1)]
    for n in names:
        cells = [pm((by[(n, s)]["accuracy_mean"], by[(n, s)]["accuracy_std"])) if (n, s) in by else "–" for s in settings]
        c = by.get((n, "W4A4"))
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {c['cpu_s_mean']:.0f} |" if c else f"| {n} | " + " | ".join(cells) + " | – |")
    return [head, ""] + lines + [""]


def deploy_section() -> list[str]:
    src = notebook_metrics("06_triton_deployment") or {}
    m = src.get("metrics")
    rows = [r for r in (m or {}).get("accuracy", []) if not r.get("error")]
    if not rows:
        return []
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    by = {(r["variant"], r["setting"]): r for r in rows}
    errs = [r["layer_max_rel_err"] for r in rows if r.get("layer_max_rel_err") is not None]
    lines = ["### Packed integer model vs its fake-quant twin, every method (notebook 06, full mode)", "",
             f"Accuracy % of the fake-quant model / of the packed model on the same {rows[0]['n_eval']} test samples "
             f"(share of identical answers); packed models evaluated with {m['packed_backend']} "
             f"({'Triton kernels' if m['packed_backend'] == 'kernels' else 'plain-torch references over the same integers'}); "
             f"calibration seed 0." + (f" Largest layer-local relative error: {max(errs):.1e}." if errs else "")
             + (f" Read back from {src['recovered_from']}." if src.get("recovered_from") else ""), "",
             "| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for meth in dict.fromkeys(r["variant"] for r in rows):
        cells = [f"{_pct(by[(meth, s)]['accuracy'])} / {_pct(by[(meth, s)]['packed_acc'])} ({by[(meth, s)]['agreement']:.2f})"
                 if (meth, s) in by else "–" for s in settings]
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return lines + [""]


def figures_section() -> list[str]:
    man = _json(PUBLISHED / "manifest.json")
    if not man:
        return []
    figs = [f for e in man["notebooks"].values() for f in e["figures"] if any(k in f for k in KEY_FIGURES)]
    out = ["### Key figures (`results/published/`, executed notebooks beside them)", "",
           "Published " + "; ".join(f"`{k}` from commit `{e.get('git_commit', man['git_commit'])[:10]}` on "
                                    f"{e.get('date', man['date'])}" for k, e in man["notebooks"].items())
           + ". `python -m qvlm.report.publish --check` says whether they are current.", ""]
    out += [f"![{f}](results/published/{f})" for f in figs]
    return out + [""]


def runtime_section() -> list[str]:
    smoke = _json(REPO_ROOT / "tests" / "reference" / "smoke_seconds.json") or {}
    man = _json(PUBLISHED / "manifest.json") or {"notebooks": {}}
    full = {**(_json(RESULTS_DIR / "seconds.json") or {}),              # this machine's last runs, then the published
            **{k: e["seconds"] for k, e in man["notebooks"].items() if e.get("seconds") is not None}}
    if not smoke and not full:
        return []
    stems = sorted(set(smoke) | set(full))
    out = ["### Runtime per notebook (2 CPU cores)", "", "| notebook | smoke (tiny), s | full (CPU preset), s |",
           "|---|---|---|"]
    resumed = {k: e["stored_rows_at_start"] for k, e in man["notebooks"].items() if e.get("stored_rows_at_start")}
    out += [f"| `{s}` | {smoke.get(s, '–')} | {full.get(s, '–')}"
            + (f" (resumed: {resumed[s]} stored rows at its start)" if s in resumed else "") + " |" for s in stems]
    if resumed:
        out += ["", "Resumed (`python -m qvlm.reproduce --resume`): the seconds are the last run's; the searches it read "
                    "back from results/rows/ were timed by the run that stored them (each row's `wall_s`, `cpu_s`)."]
    if full:
        done = f"{len(full)} of {len(stems)} notebooks" if len(full) < len(stems) else "every notebook"
        out += ["", f"`make reproduce` so far: {sum(full.values()) / 60:.0f} min ({done})."
                if len(full) < len(stems) else f"`make reproduce` total: {sum(full.values()) / 60:.0f} min."]
    return out + [""]


def bench_section() -> list[str]:
    """Every committed bench table (results/published/bench/NAME/{accuracy,veo}.md: each names its own command)."""
    out = []
    for kind in ("accuracy", "veo"):
        for path in sorted((PUBLISHED / "bench").glob(f"*/{kind}.md")):
            out += [f"### `python -m bench.{kind}` ({path.relative_to(REPO_ROOT)})", "", path.read_text().strip(), ""]
            png = path.with_suffix(".png")                 # bench.veo draws its runs beside its table
            if png.is_file():
                out += [f"![{path.parent.name}]({png.relative_to(REPO_ROOT)})", ""]
    return out


def render() -> str:
    lines = [START, "## Results", "",
             "Generated by `python -m qvlm.report.readme` from the files named in each heading; every number comes from "
             "the command given there.", ""]
    lines += (claims_section() + main_table_section() + deploy_section() + figures_section() + testbed_section("smol")
              + testbed_section("tiny") + runtime_section() + bench_section())
    return "\n".join(lines + [END])


def main() -> int:
    readme = REPO_ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print("README.md lacks the results markers", file=sys.stderr)
        return 2
    atomic_write_text(readme, re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: render(), text, flags=re.S))
    print("README results section regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
