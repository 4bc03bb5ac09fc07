"""Run every notebook with papermill: `python -m qvlm.reproduce --mode full|smoke [--only 00,05] [--update-reference]`.

full  (make reproduce): executed notebooks -> results/executed/NN_*.ipynb, each notebook's figures and
      metrics -> results/NN_*/full/, and one merged results/metrics.json.
smoke (make update-reference): same in smoke mode into results/*/smoke; with --update-reference the
      regression keys of each notebook's smoke metrics are written to tests/reference/NN_*.json (on purpose:
      a changed reference then shows in the diff).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import papermill as pm
import torch

from .errors import QVLMError
from .experiments import ROW_CACHE_ENV, RowCache
from .paths import REPO_ROOT, RESULTS_DIR, ROWS_DIR, notebooks
from .config import PRESET_NAMES
from .report.claims import UPSTREAM, missing_upstream, upstream_dir
from .provenance import code_version
from .report.publish import publish as publish_notebooks
from .utils import atomic_write_json

REFERENCE_DIR = REPO_ROOT / "tests" / "reference"


def executed_path(nb: Path, mode: str, root: Path = RESULTS_DIR) -> Path:
    """Where the executed copy of `nb` goes: root/executed/NN_*.ipynb (full) or NN_*.smoke.ipynb (smoke)."""
    return Path(root) / "executed" / (nb.name if mode == "full" else f"{nb.stem}.{mode}.ipynb")


FULL_CELL_TIMEOUT = 8 * 3600   # seconds per cell in full mode: one cell of 03 / 05 runs dozens of searches on smol,
                               # each evaluated on 500 test samples -- hours on 2 CPU cores (one hour was too short)


# Smoke-mode values of parameters whose full-mode default alone would take a notebook's smoke run past its 90 s
# budget (tests/test_notebooks.py). Every smoke run through `run_notebook` gets them -- the tests, `reproduce --mode
# smoke` and notebook 07's upstream runs alike -- so the pinned references and the timed runs are one smoke run.
SMOKE_PARAMETERS = {                                    # (2026-12-07, idle 2 cores: 04 138 s with its full ETAS, 98 s
    "03_block_partitioning": {"PROFILE_BITS": "4"},     # with "0,1"; 06 107 s with rtn,brecq,qvlm, 97 s with rtn,qvlm;
    "04_encoder_disentangling": {"ETAS": "1"},          # 03 91 s with the explorer's 4,6,8-bit profiles)
    "06_triton_deployment": {"METHODS": "qvlm"},        # 03: the explorer's slider offers A_BITS only (the profile the
}                                                       # partition uses); 04: the η sweep is ETA's point alone, the
                                                        # +VEO ablation row reused; 06: fake vs packed for the learned
                                                        # method, per kernel family (the RTN packed model is section 4's)


def notebook_parameters(nb: Path, mode: str, out_dir: Path, parameters: dict | None = None) -> dict:
    """What papermill injects: the smoke values above (smoke mode), then the caller's `parameters` (they win), then
    MODE and OUT_DIR."""
    smoke = SMOKE_PARAMETERS.get(nb.stem, {}) if mode == "smoke" else {}
    return {**smoke, **(parameters or {}), "MODE": mode, "OUT_DIR": str(out_dir)}


def run_notebook(nb: Path, mode: str, out_dir: Path, executed: Path, timeout: int = FULL_CELL_TIMEOUT,
                 parameters: dict | None = None, progress: bool = False) -> dict:
    """Execute one notebook with papermill (`notebook_parameters`: MODE, OUT_DIR, smoke sizes, plus any other
    `parameters`, e.g. notebook 07's SOURCES); returns its metrics.json content. `progress`: papermill's per-cell
    progress bar."""
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    executed.parent.mkdir(parents=True, exist_ok=True)
    params = notebook_parameters(nb, mode, out_dir, parameters)
    pm.execute_notebook(str(nb), str(executed), parameters=params,
                        kernel_name="python3", cwd=str(REPO_ROOT), execution_timeout=timeout, progress_bar=progress)
    return json.loads((out_dir / "metrics.json").read_text())


# Tolerances of the pinned smoke numbers (tests/reference/README.md says why):
ACC_SE = 3.0            # accuracies: 3 binomial standard errors at the smoke evaluation size (a 4-bit model's
                        # predictions move with a machine's floating-point path; ~0.3 % of honest reruns fall outside)
REL_TOL = 0.02          # continuous statistics (entropies, ratios, fits): 2 % relative
EXACT = ("max_abs_diff", "n_trained_params", "n_edges", "n_claims", "n_measured")   # integers that must not move


def tolerance(key: str, value: float, n_eval: int) -> dict:
    """{"abs", "rel", "rule"} of one pinned number (see tests/reference/README.md)."""
    if any(e in key for e in EXACT):
        return dict(abs=0.0, rel=0.0, rule="exact")
    if "acc" in key:
        se = math.sqrt(max(value * (1 - value), 1.0 / n_eval) / n_eval)
        return dict(abs=round(ACC_SE * se, 4), rel=0.0, rule=f"{ACC_SE:g} binomial SE at n={n_eval}")
    return dict(abs=1e-9, rel=REL_TOL, rule=f"{100 * REL_TOL:g} % relative")


def regression_keys(metrics: dict) -> dict:
    """The numbers a notebook pins for regression (its metrics' `regression` dict), each with its tolerance."""
    reg = metrics.get("metrics", {}).get("regression", {})
    n_eval = (metrics.get("config") or {}).get("n_eval") or 1000
    return {k: {"value": v, **tolerance(k, v, n_eval)} for k, v in sorted(reg.items())}


def ensure_upstream(sources: str = "", mode: str = "full", stems=UPSTREAM, parameters: dict | None = None,
                    runner=None, log=print) -> list[str]:
    """Run every upstream notebook whose metrics are missing, in `mode`, into its sources location; returns the
    stems it ran. `runner(nb, mode, out_dir, executed, parameters=...)` defaults to `run_notebook`
    (injectable for tests); `parameters` (e.g. MODEL, SEED) are passed on to each notebook."""
    runner = runner or run_notebook
    todo = missing_upstream(sources, mode, stems)
    by_stem = {nb.stem: nb for nb in notebooks()}
    for stem in todo:
        if stem not in by_stem:
            raise QVLMError(f"no notebook notebooks/{stem}.ipynb to produce missing outputs",
                            f"pass SOURCES holding {stem}/metrics.json")
        out = upstream_dir(stem, sources, mode)
        executed = executed_path(by_stem[stem], mode, Path(sources) if sources else RESULTS_DIR)
        log(f"[07] {stem}: no metrics.json in {out} -- running notebooks/{stem}.ipynb in {mode} mode (executed copy: "
            f"{executed})")
        runner(by_stem[stem], mode, out, executed, parameters=parameters or {})
    return todo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["full", "smoke"], default="full")
    ap.add_argument("--preset", choices=list(PRESET_NAMES), default="cpu")
    ap.add_argument("--model", default="", help="MODEL for every notebook ('' = each notebook's default: smol)")
    ap.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,05")
    ap.add_argument("--update-reference", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help=f"keep every finished search of the notebooks' grids in {ROWS_DIR.relative_to(REPO_ROOT)}/ and "
                         "reuse the ones a stopped run of the same code stored there (the executed notebook says "
                         "which rows it read back: resumed_from)")
    args = ap.parse_args(argv)
    if args.resume:
        os.environ[ROW_CACHE_ENV] = str(ROWS_DIR)             # the notebook kernels inherit it
    if args.update_reference and not args.model:
        args.model = "tiny"                                  # the pinned smoke references are tiny's
    params = {"PRESET": args.preset, **({"MODEL": args.model} if args.model else {})}
    merged, seconds, versions = {}, {}, {}
    for nb in notebooks(args.only):
        t0 = time.time()
        print(f"[reproduce] {nb.name} ({args.mode}, {params}) ...", flush=True)
        out_dir = RESULTS_DIR / nb.stem / args.mode
        versions[nb.stem] = code_version()                   # what the kernel imports: the code as it starts
        if args.resume:                                      # its runtime below is then this run's, not the whole
            versions[nb.stem]["stored_rows_at_start"] = RowCache.count(ROWS_DIR)
        m = run_notebook(nb, args.mode, out_dir, executed_path(nb, args.mode), progress=True, parameters=params)
        if code_version()["code_hash"] != versions[nb.stem]["code_hash"]:
            print(f"[reproduce] warning: qvlm/ or kernels/ changed while {nb.name} ran; it is published with the "
                  "code it started with, which `python -m qvlm.report.publish --check` will call stale", flush=True)
        merged[nb.stem] = m.get("metrics", {})
        seconds[nb.stem] = round(time.time() - t0, 1)
        print(f"[reproduce] {nb.name} done in {seconds[nb.stem]:.0f}s -> {out_dir}", flush=True)
        if args.update_reference:
            atomic_write_json(REFERENCE_DIR / f"{nb.stem}.json", regression_keys(m))
    if args.update_reference:                            # the README lists these (idle 2-core machine); --only
        path = REFERENCE_DIR / "smoke_seconds.json"      # re-times the notebooks it names, keeps the others
        old = json.loads(path.read_text()) if (path.exists() and args.only) else {}
        atomic_write_json(path, {**old, **seconds})
    if args.mode == "full":
        path = RESULTS_DIR / "metrics.json"
        old = json.loads(path.read_text()) if (path.exists() and args.only) else {}
        atomic_write_json(path, {**old, **merged})
        old_s = json.loads((RESULTS_DIR / "seconds.json").read_text()) if (RESULTS_DIR / "seconds.json").exists() else {}
        atomic_write_json(RESULTS_DIR / "seconds.json", {**old_s, **seconds})
        man = publish_notebooks(notebooks(args.only), seconds={**old_s, **seconds}, versions=versions)
        print(f"[reproduce] published {len(man['notebooks'])} notebooks ({man['size_bytes'] / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
