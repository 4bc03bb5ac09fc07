"""VEO on its own (paper Sec. 3.3, Eq. 5): an (eta, lr) sweep over calibration seeds, chosen on VAL, never test.

    python -m bench.veo --model smol --etas 1,3 --lrs 1e-4,3e-4 --seeds 0,1,2 --out results/published/bench/veo-sweep

For every (anchor, eta, lr, seed) -- anchor "ar": the paper's L_AR, "kl": KL to the FP model -- it trains a new
vision encoder on the TRAIN calibration samples
(qvlm.method.disentangle.run_disentangle; the FP model is untouched), then reports what issue-level targets ask:
the gamma-weighted hard code entropy of the LLM inputs VEO targets (image positions) before -> after and its relative
change, the same inputs' peakedness (mean log(absmax / rms) per token, `log_crest`: a per-token quantizer's entropy
falls when tokens get MORE peaked), the KL to the FP answer distribution, and the guard: FP accuracy on VAL before ->
after (disentangle.check_guard; reverted when it falls by more than the guard). A setting is "usable" when no seed
is reverted; the pick is the usable setting with the largest mean entropy drop. The VEO cost is CPU seconds of the
training alone (the guard's two val evaluations are reported apart). Writes accuracy-style veo.md / veo.json and
veo.png: every run as entropy change against FP val change (`--with DIR,...` adds earlier sweeps' runs to the figure
only, e.g. the other anchor's sweep; the tables stay this sweep's).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from itertools import product
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qvlm import data, loading
from qvlm.config import MODES, PRESET_NAMES, parse_setting, resolve
from qvlm.errors import QVLMError
from qvlm.method import disentangle
from qvlm.method.pipeline import QVLMConfig
from qvlm.paths import RESULTS_DIR
from bench.accuracy import code_line
from qvlm.report import plots
from qvlm.provenance import code_version
from qvlm.report.publish import compress_png
from qvlm.report.stats import pm
from qvlm.utils import atomic_write_json, atomic_write_text


def _floats(text: str, name: str) -> list[float]:
    try:
        out = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise QVLMError(f"bad --{name} {text!r}", f"pass comma-separated numbers, e.g. --{name} 1,3") from None
    if not out:
        raise QVLMError(f"empty --{name}", f"pass comma-separated numbers, e.g. --{name} 1,3")
    return out


def _anchors(text: str) -> list[str]:
    out = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [a for a in out if a not in disentangle.ANCHORS]
    if not out or bad:
        raise QVLMError(f"bad --anchors {text!r}", f"pass a comma-separated subset of {', '.join(disentangle.ANCHORS)}")
    return out


def run(model_name="smol", dataset="tiny", setting="W4A4", etas=(1.0,), lrs=(1e-3,), seeds=(0, 1, 2), mode="full",
        preset="cpu", progress=True, done: dict | None = None, anchors=("ar",)) -> dict:
    """Train one VEO encoder per (anchor, eta, lr, seed) and measure it; returns the JSON-able results. `done`: an
    earlier
    run's results (same model, setting, mode, preset) whose rows are kept and not recomputed (same seed -> same row)."""
    code = code_version()                       # at the start: the code that ran, even if files change meanwhile
    cfg = resolve(mode, preset=preset, model=model_name, dataset=dataset, notebook="bench")
    qcfg = parse_setting(setting)
    if done and (done["model"], done["setting"], done["mode"], done["preset"]) != (model_name, qcfg.setting, mode, preset):
        raise QVLMError(f"--resume: the results there are for {done['model']} {done['setting']} ({done['mode']}, "
                        f"{done['preset']})", "resume with the same --model, --setting, --mode and --preset")
    model, processor = loading.load(model_name)
    base = QVLMConfig()
    val = data.load_split(dataset, "val", limit=base.n_guard)                 # the guard reads VAL only
    rows = list(done["rows"]) if done else []
    for r in rows:                                   # sweeps from before the anchor knob ran the paper's L_AR
        r.setdefault("anchor", "ar")
    have = {(r["anchor"], r["eta"], r["lr"], r["seed"]) for r in rows}
    todo = [c for c in product(anchors, etas, lrs, seeds) if c not in have]
    for anchor, eta, lr, seed in tqdm(todo, desc="VEO sweep", disable=not progress):
        calib = data.calibration_set(dataset, cfg.n_calib, seed)             # TRAIN split only
        veo_cfg = QVLMConfig(eta=eta, veo_lr=lr, veo_anchor=anchor).veo_config(cfg.batch_size)
        t0 = time.process_time()
        res = disentangle.run_disentangle(model, processor, calib, veo_cfg, qcfg, seed=seed)
        cpu_s = time.process_time() - t0
        t0 = time.process_time()
        disentangle.check_guard(model, processor, res, val, cfg.batch_size)
        s = disentangle.summary(res)
        rows.append(dict(anchor=anchor, eta=eta, lr=lr, seed=seed, H_before=s["H_image_before"],
                         H_after=s["H_image_after"],
                         H_change=s["H_image_after"] / s["H_image_before"] - 1, crest_before=s["crest_before"],
                         crest_after=s["crest_after"], kl_after=s["kl_after"], grad_l_ar=s["grad_l_ar"],
                         grad_entropy=s["grad_entropy"], fp_val_before=s["fp_val_before"],
                         fp_val_after=s["fp_val_after"], reverted=s["reverted"], cpu_s=cpu_s,
                         guard_cpu_s=time.process_time() - t0))
    return dict(model=model_name, dataset=dataset, setting=qcfg.setting, n_calib=cfg.n_calib, n_guard=len(val),
                guard=base.guard, veo_iters=base.veo_iters, encoder_params=base.encoder_params, eta_mode=base.eta_mode,
                seeds=sorted({r["seed"] for r in rows}), mode=mode, preset=preset, torch=torch.__version__,
                threads=torch.get_num_threads(), code=code,
                rows=sorted(rows, key=lambda r: (r["anchor"], r["eta"], r["lr"], r["seed"])))


def settings_table(res: dict) -> list[dict]:
    """Per (anchor, eta, lr): mean +- std over seeds of the entropy change (%), the crest change and the FP val change
    (points), how many seeds the guard reverted, and the mean VEO CPU seconds."""
    out = []
    key_of = lambda r: (r.get("anchor", "ar"), r["eta"], r["lr"])     # noqa: E731
    for key in dict.fromkeys(key_of(r) for r in res["rows"]):
        rs = [r for r in res["rows"] if key_of(r) == key]
        col = lambda f: torch.tensor([f(r) for r in rs], dtype=torch.float64)   # noqa: E731
        stat = lambda t: (float(t.mean()), float(t.std()) if len(t) > 1 else None)  # noqa: E731
        out.append(dict(anchor=key[0], eta=key[1], lr=key[2], n=len(rs),
                        H_change=stat(col(lambda r: 100 * r["H_change"])),
                        crest_change=stat(col(lambda r: r["crest_after"] - r["crest_before"])),
                        val_change=stat(col(lambda r: 100 * (r["fp_val_after"] - r["fp_val_before"]))),
                        n_reverted=sum(bool(r["reverted"]) for r in rs),
                        cpu_s=float(col(lambda r: r["cpu_s"]).mean())))
    return out


def pick(table: list[dict]) -> dict | None:
    """The usable setting (no seed reverted by the guard) with the largest mean entropy drop, or None."""
    usable = [t for t in table if t["n_reverted"] == 0]
    return min(usable, key=lambda t: t["H_change"][0]) if usable else None


def frontier_r(rows: list[dict]) -> tuple[int, float] | None:
    """(n, Pearson r) between the entropy change and the FP val change over runs (None below 3 runs or no spread):
    how tightly lowering the entropy and losing FP accuracy go together."""
    if len(rows) < 3:
        return None
    t = torch.tensor([[r["H_change"], r["fp_val_after"] - r["fp_val_before"]] for r in rows], dtype=torch.float64)
    if bool((t.std(0) == 0).any()):
        return None
    return len(rows), float(torch.corrcoef(t.T)[0, 1])


def to_markdown(res: dict) -> str:
    table = settings_table(res)
    best = pick(table)
    lines = ([f"`{res['command']}`", ""] if res.get("command") else []) + [
        f"Model `{res['model']}`, {res['setting']} (the entropy of the a_bits codes), VEO trains the vision tower's "
        f"{res['encoder_params']} parameters for {res['veo_iters']} steps on {res['n_calib']} TRAIN samples per seed "
        f"(seeds {res['seeds']}), eta {res['eta_mode']} to L_AR's gradient (anchor ar: L_AR + eta H, the paper's "
        f"Eq. 5; kl: KL to the FP answer distribution + eta H); guard: FP accuracy on {res['n_guard']} "
        f"VAL samples may fall by at most {100 * res['guard']:.1f} points, else the run is reverted. torch "
        f"{res['torch']}, {res['threads']} threads.", "", *([code_line(res), ""] if res.get("code") else []),
        "Mean ± std over seeds (a bare number: one seed): change of the targeted entropy (image positions, %), of the inputs' peakedness "
        "(mean log(absmax/rms) per token; up = more peaked), of FP val accuracy (points); seeds reverted; VEO CPU s",
        "", "| anchor | eta | lr | entropy % | log-crest | FP val, points | reverted | CPU s |",
        "|---|---|---|---|---|---|---|---|"]
    cell = lambda ms, d=1: f"{ms[0]:.{d}f}" if ms[1] is None else pm(ms, 1, d)      # noqa: E731  (one seed: no std)
    lines += [f"| {t['anchor']} | {t['eta']:g} | {t['lr']:g} | {cell(t['H_change'])} | {cell(t['crest_change'], 3)} | "
              f"{cell(t['val_change'])} | {t['n_reverted']}/{t['n']} | {t['cpu_s']:.0f} |" for t in table]
    lines += ["", "Per run: entropy before -> after, FP val before -> after", ""]
    lines += [f"- {r.get('anchor', 'ar')}, eta {r['eta']:g}, lr {r['lr']:g}, seed {r['seed']}: "
              f"H {r['H_before']:.4f} -> {r['H_after']:.4f} "
              f"({100 * r['H_change']:+.1f} %), log-crest {r['crest_before']:.3f} -> {r['crest_after']:.3f}, FP val "
              f"{100 * r['fp_val_before']:.1f} -> {100 * r['fp_val_after']:.1f}, "
              f"{'reverted' if r['reverted'] else 'kept'}" for r in res["rows"]]
    verdict = ("no setting passes the guard in every seed" if best is None else
               f"picked on val: anchor {best['anchor']}, eta {best['eta']:g}, lr {best['lr']:g} "
               f"(entropy {cell(best['H_change'])} %)")
    with_ = f", with the runs of {', '.join(res['figure_with'])} (`--with`)" if res.get("figure_with") else ""
    r = f" (n = {res['figure_r'][0]} runs, Pearson r = {res['figure_r'][1]:.2f})" if res.get("figure_r") else ""
    figure = f"veo.png: every run above{with_}: entropy change against FP val change{r}."
    return "\n".join(lines + ["", f"Choice: {verdict}.", "", figure, ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.veo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smol")
    p.add_argument("--dataset", default="tiny")
    p.add_argument("--setting", default="W4A4", help="a WxAy label: VEO lowers the entropy of the a_bits codes")
    p.add_argument("--etas", default=str(QVLMConfig().eta), help="comma-separated entropy weights (relative)")
    p.add_argument("--lrs", default=str(QVLMConfig().veo_lr), help="comma-separated Adam learning rates")
    p.add_argument("--anchors", default=QVLMConfig().veo_anchor,
                   help="comma-separated anchors: ar (L_AR, the paper) | kl (KL to the FP model)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated calibration seeds")
    p.add_argument("--mode", default="full", choices=list(MODES))
    p.add_argument("--preset", default="cpu", choices=list(PRESET_NAMES))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench" / "veo"), help="directory for veo.md / veo.json")
    p.add_argument("--resume", action="store_true", help="keep the rows of veo.json in --out, run only the missing ones")
    p.add_argument("--with", dest="with_", default="",
                   help="comma-separated directories of earlier sweeps (veo.json) whose runs veo.png also shows")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in _floats(args.seeds, "seeds")]
        others = [Path(d) / "veo.json" for d in args.with_.split(",") if d.strip()]
        missing = [str(o) for o in others if not o.is_file()]
        if missing:
            raise QVLMError(f"--with: no {missing[0]}", "point --with at directories an earlier bench.veo wrote")
        prev = Path(args.out) / "veo.json"
        if args.resume and not prev.is_file():
            raise QVLMError(f"--resume: no {prev}", "drop --resume, or point --out at an earlier sweep")
        res = run(args.model, args.dataset, args.setting, _floats(args.etas, "etas"), _floats(args.lrs, "lrs"),
                  seeds, args.mode, args.preset, not args.no_progress,
                  json.loads(prev.read_text()) if args.resume else None, _anchors(args.anchors))
    except QVLMError as e:
        print(f"bench.veo: error: {e}", file=sys.stderr)
        return 2
    res["command"] = "python -m bench.veo " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.resume:                                      # the rows kept came from the earlier command(s)
        earlier = json.loads(prev.read_text())
        added = len(res["rows"]) > len(earlier["rows"])
        res["command"] = earlier.get("command", "?") + (" && " + res["command"] if added else "")
        if not added:                                    # nothing recomputed: the rows are the earlier code's
            res["code"] = earlier.get("code")
    res["figure_with"] = [str(o.parent) for o in others]
    rows = res["rows"] + [r for o in others for r in json.loads(o.read_text())["rows"]]
    res["figure_r"] = frontier_r(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    atomic_write_json(out / "veo.json", res)
    atomic_write_text(out / "veo.md", md)
    fig = plots.veo_frontier(rows, res["guard"], f"VEO on {res['model']} {res['setting']}: each run (labels: eta / lr)")
    fig.savefig(out / ".veo.png.tmp", dpi=150, bbox_inches="tight", format="png")
    compress_png(out / ".veo.png.tmp", out / "veo.png")
    (out / ".veo.png.tmp").unlink()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
