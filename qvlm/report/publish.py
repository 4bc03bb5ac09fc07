"""What a reader sees without running anything: the executed full-mode notebooks and their figures, committed under
results/published/, and a manifest that says which code produced them.

    python -m qvlm.report.publish          # after `make reproduce` (which calls it): copy + compress + manifest
    python -m qvlm.report.publish --check  # list what is stale (exit 1 if anything is)

results/published/
    NN_name.ipynb          the executed notebook (outputs kept: a reader on the web sees every table and plot)
    figures/NN_name-<figure>.png   each notebook's saved figures, re-encoded as palette PNGs (the README embeds them)
    metrics/NN_name.json   the run's metrics.json (config + every number it saved; the README's tables read these)
    manifest.json          per notebook: the git commit and hash of the code (qvlm/, kernels/) that ran it, a hash of
                           its source cells, model, mode, preset, seconds, date (publishing one notebook keeps the
                           entries of the others)

Stale = a notebook whose source cells differ from the published copy's (its results no longer come from the code),
or code that changed since its publication (its entry's code hash differs: then the numbers may still hold, but
`make reproduce` should be rerun). Total size is kept under SIZE_BUDGET.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
from pathlib import Path

from PIL import Image

from ..paths import PUBLISHED, RESULTS_DIR, notebooks
from ..provenance import code_hash, git_commit
from ..utils import atomic_write_json

SIZE_BUDGET = 10 * 2 ** 20           # bytes: executed notebooks + figures
MAX_WIDTH = 1400                     # figures are downscaled to at most this many pixels wide


def source_cells(nb_path: Path) -> list[str]:
    """The code of a notebook's cells, without the parameters papermill injects (the comparison key)."""
    nb = json.loads(Path(nb_path).read_text())
    out = []
    for c in nb["cells"]:
        if c["cell_type"] == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", []):
            out.append("".join(c["source"]))
    return out


def notebook_hash(nb_path: Path) -> str:
    return hashlib.sha256("\n\0".join(source_cells(nb_path)).encode()).hexdigest()


def compress_png(src: Path, dst: Path) -> None:
    """A smaller copy of a matplotlib PNG: at most MAX_WIDTH wide, 256-colour palette."""
    im = Image.open(src).convert("RGB")
    if im.width > MAX_WIDTH:
        im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def publish(notebooks: list[Path], mode: str = "full", seconds: dict | None = None, results: Path = RESULTS_DIR,
            out: Path = PUBLISHED, versions: dict | None = None) -> dict:
    """Copy each executed notebook of `mode` and its figures into `out`, write the manifest; returns it.
    `versions`: {stem: code_version()} taken when each notebook STARTED (qvlm.reproduce); a notebook without one
    is recorded with the code as it is now."""
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "manifest.json"
    entries = json.loads(previous.read_text())["notebooks"] if previous.is_file() else {}
    entries = {k: e for k, e in entries.items() if (out / f"{k}.ipynb").is_file()}   # kept: published earlier
    commit, code, today = git_commit(), code_hash(), datetime.date.today().isoformat()
    for nb in notebooks:
        executed = results / "executed" / nb.name
        if not executed.is_file():
            continue
        shutil.copyfile(executed, out / nb.name)
        metrics = json.loads((results / nb.stem / mode / "metrics.json").read_text())
        atomic_write_json(out / "metrics" / f"{nb.stem}.json", metrics)
        figs = []
        for fig in metrics.get("figures", []):
            src = results / nb.stem / mode / f"{fig}.png"
            if src.is_file():
                compress_png(src, out / "figures" / f"{nb.stem}-{fig}.png")
                figs.append(f"figures/{nb.stem}-{fig}.png")
        cfg = metrics.get("config") or {}
        entries[nb.stem] = dict(source_hash=notebook_hash(nb), figures=figs, model=cfg.get("model"),
                                mode=cfg.get("mode"), preset=cfg.get("preset"), seconds=(seconds or {}).get(nb.stem),
                                **(versions or {}).get(nb.stem, dict(git_commit=commit, code_hash=code)), date=today)
    manifest = dict(git_commit=commit, code_hash=code, date=today, notebooks=dict(sorted(entries.items())),
                    size_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()))
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def published_metrics(stem: str, out: Path = PUBLISHED) -> dict | None:
    """The metrics.json a published notebook's run wrote (None if it is not published with its metrics)."""
    f = out / "metrics" / f"{stem}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def stale(notebooks: list[Path], out: Path = PUBLISHED) -> list[str]:
    """Human-readable reasons the published results do not come from the current code (empty = current)."""
    f = out / "manifest.json"
    if not f.is_file():
        return ["nothing is published (run `make reproduce`)"]
    man = json.loads(f.read_text())
    code = code_hash()
    reasons = []
    for nb in notebooks:
        e = man["notebooks"].get(nb.stem)
        if e is None:
            reasons.append(f"{nb.stem} is not published")
        elif e["source_hash"] != notebook_hash(nb):
            reasons.append(f"{nb.stem} changed since it was published")
        elif e.get("code_hash", man.get("code_hash")) != code:
            reasons.append(f"{nb.stem}: the package code changed since it was published "
                           f"(commit {e.get('git_commit', man.get('git_commit', '?'))[:10]})")
    return reasons


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        reasons = stale(notebooks())
        print("\n".join(reasons) or "published results are current")
        return 1 if reasons else 0
    man = publish(notebooks())
    print(f"published {len(man['notebooks'])} notebooks, {man['size_bytes'] / 2**20:.1f} MiB -> {PUBLISHED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
