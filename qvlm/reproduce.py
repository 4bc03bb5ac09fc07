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
import os
import sys
import time
from pathlib import Path

import papermill as pm
import torch

from .errors import QVLMError
from .paths import REPO_ROOT, RESULTS_DIR
from .report.claims import UPSTREAM, missing_upstream, upstream_dir
from .utils import atomic_write_json

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
REFERENCE_DIR = REPO_ROOT / "tests" / "reference"


def notebooks(only: str = "") -> list[Path]:
    nbs = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        keep = {k.strip() for k in only.split(",")}
        nbs = [p for p in nbs if p.name[:2] in keep or p.stem in keep]
    return nbs


def executed_path(nb: Path, mode: str, root: Path = RESULTS_DIR) -> Path:
    """Where the executed copy of `nb` goes: root/executed/NN_*.ipynb (full) or NN_*.smoke.ipynb (smoke)."""
    return Path(root) / "executed" / (nb.name if mode == "full" else f"{nb.stem}.{mode}.ipynb")


def run_notebook(nb: Path, mode: str, out_dir: Path, executed: Path, timeout: int = 3600,
                 parameters: dict | None = None, progress: bool = False) -> dict:
    """Execute one notebook with papermill (MODE, OUT_DIR injected, plus any other `parameters`, e.g. notebook
    07's SOURCES); returns its metrics.json content. `progress`: papermill's per-cell progress bar."""
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    executed.parent.mkdir(parents=True, exist_ok=True)
    params = {**(parameters or {}), "MODE": mode, "OUT_DIR": str(out_dir)}
    pm.execute_notebook(str(nb), str(executed), parameters=params,
                        kernel_name="python3", cwd=str(REPO_ROOT), execution_timeout=timeout, progress_bar=progress)
    return json.loads((out_dir / "metrics.json").read_text())


ACC_ABS_TOL = 0.025     # accuracies: smoke evals use ~48 samples, 1 sample = 0.021; allows one flip across machines
REL_TOL = 0.05          # every other pinned number (errors, entropies, ratios): 5 % float drift across BLAS builds


def regression_keys(metrics: dict) -> dict:
    """The numbers a notebook pins for regression (its metrics' `regression` dict), each with its tolerance."""
    reg = metrics.get("metrics", {}).get("regression", {})
    return {k: {"value": v, "abs": ACC_ABS_TOL if "acc" in k else 1e-6, "rel": 0.0 if "acc" in k else REL_TOL}
            for k, v in sorted(reg.items())}


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
    ap.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,05")
    ap.add_argument("--update-reference", action="store_true")
    args = ap.parse_args(argv)
    merged = {}
    for nb in notebooks(args.only):
        t0 = time.time()
        print(f"[reproduce] {nb.name} ({args.mode}) ...", flush=True)
        out_dir = RESULTS_DIR / nb.stem / args.mode
        executed = executed_path(nb, args.mode)
        m = run_notebook(nb, args.mode, out_dir, executed, progress=True)
        merged[nb.stem] = m.get("metrics", {})
        print(f"[reproduce] {nb.name} done in {time.time() - t0:.0f}s -> {out_dir}", flush=True)
        if args.update_reference:
            atomic_write_json(REFERENCE_DIR / f"{nb.stem}.json", regression_keys(m))
    if args.mode == "full" and not args.only:
        atomic_write_json(RESULTS_DIR / "metrics.json", merged)
    elif args.mode == "full":
        path = RESULTS_DIR / "metrics.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        atomic_write_json(path, {**old, **merged})
    return 0


if __name__ == "__main__":
    sys.exit(main())
