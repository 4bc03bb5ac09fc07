"""Accuracy of every registered method at every setting, over calibration seeds, in one process.

    python -m bench.accuracy                                   # smol, every method, the CPU preset
    python -m bench.accuracy --model tiny --methods rtn,brecq,qvlm --settings W4A4 --seeds 0,1,2
    python -m bench.accuracy --preset gpu                      # paper-scale settings (needs a GPU to be quick)
    python -m bench.accuracy --methods qvlm+rotate --settings W4A4 --veo-anchor kl --veo-lr 3e-4

Every option of the chosen methods is a flag generated from their config dataclasses (as in `qvlm run`); a flag
given overrides the preset's `iters` / `budget` too.

The one experiment runner (qvlm.experiments.grid) quantizes a fresh FP copy per (method, setting, seed), calibrating
on the TRAIN split and evaluating on the test split; the learned methods share one search machinery and, by
default, one fixed total number of steps (`--budget`). Prints mean +- std per method x setting and writes
results/bench/accuracy.{md,json}. An ordering between two cells needs non-overlapping intervals, else "tied".
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch

from qvlm import cli, experiments, loading, methods
from qvlm.config import MODES, PRESET_NAMES, parse_settings, resolve
from qvlm.errors import QVLMError
from qvlm.evaluate import chance_accuracy, majority_accuracy
from qvlm.models import llava
from qvlm.paths import RESULTS_DIR, ROWS_DIR
from qvlm.provenance import code_version   # on smol W4A4 an fp32 summation-order change moves a seed by points
from qvlm.report.stats import order, pm, summarize
from qvlm.utils import atomic_write_json, atomic_write_text


def run(model_name="smol", dataset="tiny", method_names=None, settings="", seeds=None, mode="full",
        preset="cpu", budget="auto", n_eval=-1, transform="none", device="cpu", progress=True, scope="",
        w_clip="", knobs: dict | None = None, cache=None) -> dict:
    """Quantize + evaluate every (method, setting, seed); returns the JSON-able results. `scope`: a comma-separated
    subset of vision,projector,llm to quantize (the rest stays FP: which part loses the accuracy); "" = all.
    `w_clip`: how every method's weight ranges are chosen (QuantConfig.w_clip); "" = the QuantConfig default.
    `knobs`: method options on top of the preset's (qvlm.experiments.grid hands each method its own).
    `settings` "": the table's (qvlm.experiments.TABLE_SETTINGS), where the cpu preset runs the learned searches only
    at CORE_SETTINGS (experiments.table_cell); settings given explicitly run for every method.
    `cache`: a row-cache directory (experiments.RowCache): finished runs are stored there, stored ones read back."""
    code = code_version()                       # at the start: the code that ran, even if files change meanwhile
    cfg = resolve(mode, preset=preset, model=model_name, dataset=dataset, n_eval=n_eval, notebook="bench")
    names = [experiments.variant(n)["label"] for n in (method_names or experiments.table_methods())]
    fields = dict(scope=scope, w_clip=w_clip)
    keep = None if settings else experiments.table_cell(preset)
    qcfgs = [dataclasses.replace(q, **{k: v for k, v in fields.items() if v})
             for q in parse_settings(settings or ",".join(experiments.TABLE_SETTINGS))]
    seeds = seeds or cfg.seeds
    model, processor = loading.load(model_name, device=device)
    n_layers = len(llava.blocks(model))
    total = cfg.iters * n_layers if budget == "auto" else int(budget)
    known = {k for n in names for k in methods.get(experiments.variant(n)["method"]).knob_names()}
    given = dict(knobs or {})
    knobs = {k: v for k, v in dict(iters=cfg.iters, budget=total).items() if k in known}   # preset knobs, not typed
    knobs.update(given)
    ev = cfg.eval()
    fp = experiments.fp_row(model, processor, ev, model_name)
    samples = experiments.eval_samples(ev)
    dropped = [f"{n} {q.setting}" for q in qcfgs for n in names
               if keep and not keep(experiments.variant(n)["method"], q)]
    rows = experiments.grid(model, processor, names, qcfgs, seeds, knobs=knobs, eval=ev, keep=keep,
                            calib=cfg.calib(), transform=transform, model_name=model_name, progress=progress,
                            cache=cache)
    ok = [r for r in rows if "error" not in r]
    summary = summarize(ok).to_dict("records") if ok else []
    return dict(model=model_name, dataset=dataset, n_eval=fp["n_eval"], fp_accuracy=fp["accuracy"],
                chance_accuracy=chance_accuracy(samples), majority_accuracy=majority_accuracy(samples),
                settings=[s.setting for s in qcfgs], scope=",".join(qcfgs[0].scope), w_clip=qcfgs[0].w_clip,
                seeds=list(seeds), mode=mode, preset=preset,
                calib=dict(n_calib=cfg.n_calib, batch_size=cfg.batch_size), iters=cfg.iters, budget=total,
                transform=transform, knobs=given, dropped=dropped, device=device, torch=torch.__version__,
                threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), code=code, summary=summary,
                rows=[{k: v for k, v in r.items() if k not in ("info",)} for r in rows])


def code_line(res: dict) -> str:
    return (f"Code: commit {res['code']['git_commit'][:10]}, package + kernels hash {res['code']['code_hash'][:12]} "
            "(qvlm.report.publish.code_hash; equal hash = the same code).")


def _budget_text(res: dict) -> str:
    if not res["budget"]:
        return f"{res['iters']} steps per block"
    if (res.get("knobs") or {}).get("budget_unit") == "compute":
        return (f"each at the compute of a {res['budget']}-step layer-wise search (budget_unit compute: the linear-steps "
                "of one block per transformer layer; deeper blocks get fewer steps)")
    return f"{res['budget']} steps in total"


def _knob_text(knobs: dict | None) -> str:
    return "; method options " + ", ".join(f"{k}={v}" for k, v in sorted(knobs.items())) if knobs else ""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def to_markdown(res: dict) -> str:
    """Two tables: accuracy mean +- std per method x setting (change vs FP in points), then the search cost."""
    by = {(r["variant"], r["setting"]): r for r in res["summary"]}
    names = list(dict.fromkeys(r["variant"] for r in res["summary"]))
    errors = {(r["variant"], r["setting"]) for r in res["rows"] if "error" in r}
    s = res["settings"]

    def acc(n, st):
        r = by.get((n, st))
        if r is None:
            return "error" if (n, st) in errors else "–"
        return f"{pm((r['accuracy_mean'], r['accuracy_std']))} ({100 * (r['accuracy_mean'] - res['fp_accuracy']):+.1f})"

    def cost(n, st):
        r = by.get((n, st))
        return "–" if r is None else f"{r['cpu_s_mean']:.0f}"

    lines = ([f"`{res['command']}`", ""] if res.get("command") else []) + [
             f"Model `{res['model']}`, {res['n_eval']} test samples; calibration {res['calib']['n_calib']} TRAIN samples, "
             f"seeds {res['seeds']}; learned searches: {_budget_text(res)} ({res['mode']} mode, {res['preset']} "
             f"preset); quantized: "
             f"{res.get('scope', 'vision,projector,llm')}; weight ranges {res.get('w_clip', 'minmax')}; transform "
             f"{res['transform']}{_knob_text(res.get('knobs'))}; {res['device']}, torch {res['torch']}, "
             f"{res['threads']} threads. FP accuracy "
             f"{100 * res['fp_accuracy']:.1f} %. Floors: uniform guessing {100 * res['chance_accuracy']:.1f} %, always "
             f"answering the most often correct position {100 * res['majority_accuracy']:.1f} %; a cell at or below "
             f"them ranks nothing.", "", "Accuracy %, mean ± std over seeds (change of the mean vs FP, points)", "",
             "| method | " + " | ".join(s) + " |", "|---|" + "---|" * len(s)]
    lines[-4:-4] = [code_line(res), ""] if res.get("code") else []          # after the set-up paragraph
    lines += [f"| {n} | " + " | ".join(acc(n, st) for st in s) + " |" for n in names]
    if res.get("dropped"):
        lines += ["", f"–: not run. The {res['preset']} preset runs the learned searches (AdaRound, BRECQ, Q-VLM) only at "
                      f"{', '.join(experiments.CORE_SETTINGS)}: {', '.join(res['dropped'])} (`--settings` runs them)."]
    lines += ["", "Search CPU seconds (calibration + search, mean over seeds)", "",
              "| method | " + " | ".join(s) + " |", "|---|" + "---|" * len(s)]
    lines += [f"| {n} | " + " | ".join(cost(n, st) for st in s) + " |" for n in names]
    tops = []
    for st in s:
        ranked = sorted((by[(n, st)] for n in names if (n, st) in by), key=lambda r: -r["accuracy_mean"])
        if len(ranked) > 1:
            a, b = ranked[0], ranked[1]
            verdict = order((a["accuracy_mean"], a["accuracy_std"]), (b["accuracy_mean"], b["accuracy_std"]))
            tops.append(f"- {st}: {a['variant']} {verdict} {b['variant']}")
    if tops:
        lines += ["", "Top of each setting against the runner-up (mean ± std intervals; overlapping = tied)", "", *tops]
    veo = [r for r in res["rows"] if "veo_reverted" in r]
    if veo:
        lines += ["", "Visual-encoder optimisation (VEO) per run: quantized-input entropy before -> after, FP accuracy on val "
                      "before -> after, and whether the guard reverted it (its cost stays in the search seconds)", ""]
        lines += [f"- {r['variant']} {r['setting']} seed {r['seed']}: H {r['veo_H_before']:.4f} -> {r['veo_H_after']:.4f} "
                  f"({100 * (r['veo_H_after'] / r['veo_H_before'] - 1):+.1f} %), FP val {_pct(r['veo_fp_val_before'])} -> "
                  f"{_pct(r['veo_fp_val_after'])}, {'reverted' if r['veo_reverted'] else 'kept'}" for r in veo]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smol")
    p.add_argument("--dataset", default="tiny")
    p.add_argument("--methods", default="", help="comma-separated names (default: every registered method)")
    p.add_argument("--settings", default="", help="comma-separated WxAy[Gg] labels (default: "
                   f"{','.join(experiments.TABLE_SETTINGS)}; the cpu preset runs AdaRound, BRECQ and Q-VLM only at "
                   f"{','.join(experiments.CORE_SETTINGS)})")
    p.add_argument("--seeds", default="", help="comma-separated calibration seeds (default: the preset's)")
    p.add_argument("--mode", default="full", choices=list(MODES))
    p.add_argument("--preset", default="cpu", choices=list(PRESET_NAMES))
    p.add_argument("--budget", default="auto", help="total steps of each learned search: auto | 0 (iters per block) | N")
    p.add_argument("--limit", type=int, default=-1, help="first N test samples (-1: the preset's)")
    p.add_argument("--transform", default="none")
    p.add_argument("--scope", default="", help="parts to quantize: a comma-separated subset of vision,projector,llm "
                                               "(default: all three)")
    p.add_argument("--w-clip", default="", help="weight ranges of every method: minmax | mse (default: minmax)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench"), help="directory for accuracy.md / accuracy.json "
                                                                     "(results/published/bench/NAME: committed, in the README)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="store every finished run in results/rows/ and read back "
                   "the ones stored there by an earlier run of the same code (qvlm.experiments.RowCache; notebooks "
                   "run with `qvlm.reproduce --resume` share them)")
    chosen = [n.split("+")[0] for n in (cli.selected_methods(argv) or experiments.table_methods())]
    cli.add_method_knobs(p, [n for n in dict.fromkeys(chosen) if n in methods.METHODS] or ["rtn"], skip=("budget",))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = run(args.model, args.dataset, [n for n in args.methods.split(",") if n], args.settings,
                  [int(s) for s in args.seeds.split(",") if s.strip()] or None, args.mode, args.preset, args.budget,
                  args.limit, args.transform, args.device, not args.no_progress, args.scope, args.w_clip,
                  cli.knobs_from_args(args), ROWS_DIR if args.resume else None)
    except QVLMError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    res["command"] = " ".join(["python -m bench.accuracy", *argv])
    md = to_markdown(res)
    print(md)
    out = Path(args.out)
    atomic_write_json(out / "accuracy.json", res)
    atomic_write_text(out / "accuracy.md", md)
    print(f"wrote {out / 'accuracy.md'} and {out / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
