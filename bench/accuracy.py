"""Accuracy of every registered quantization method at W8A8, W6A6, W4A4 and W4A16, in one process.

    python -m bench.accuracy                                   # the testbed, all methods, full test split
    python -m bench.accuracy --methods rtn,gptq --limit 200 --calib 16 --iters 50     # small

For each (method, config) the FP model is copied, quantized with `qvlm.methods.quantize` (calibration on the
TRAIN split) and evaluated on the test split. Prints a table and writes results/bench/accuracy.{md,json}: accuracy,
drop vs FP in points, search seconds (calibration + search wall time) and peak memory (qvlm.core.calib.peak_memory).
Every method in qvlm.methods.METHODS is included unless --methods says otherwise, so `qvlm` joins the table as
soon as qvlm/methods/qvlm.py registers it. `fp` is evaluated once, as the reference.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import re
import sys
import time
from pathlib import Path

import torch

from qvlm import data, methods, models
from qvlm.config import CalibConfig, QuantConfig
from qvlm.errors import QVLMError
from qvlm.evaluate import evaluate
from qvlm.paths import RESULTS_DIR
from qvlm.utils import atomic_write_json, atomic_write_text, seed_everything

CONFIGS = "W8A8,W6A6,W4A4,W4A16"          # the paper's settings (W6A6 / W4A4) plus deployment ones (W8A8 / W4A16)


def parse_config(tag: str) -> QuantConfig:
    """'W4A16' / 'W4A4G32' -> QuantConfig (group size optional)."""
    m = re.fullmatch(r"W(\d+)A(\d+)(?:G(\d+))?", tag.strip().upper())
    if not m:
        raise QVLMError(f"bad config {tag!r}", "write configs like W4A4, W4A16 or W4A16G32")
    return QuantConfig(w_bits=int(m[1]), a_bits=int(m[2]), group_size=int(m[3] or 0))


def run(model_name="tiny", dataset="tiny", method_names=None, configs=CONFIGS, limit=0, n_calib=0, iters=0,
        seed=0, device="cpu", dtype="float32", batch_size=32, progress=True) -> dict:
    """Quantize + evaluate every (method, config); returns the JSON-able results."""
    names = list(methods.METHODS) if not method_names else [methods.get(n).name for n in method_names]
    qcfgs = [(t.strip().upper(), parse_config(t)) for t in configs.split(",") if t.strip()]
    calib_cfg = CalibConfig(n_calib=n_calib or CalibConfig().n_calib, seed=seed)
    seed_everything(seed)
    fp_model, processor = models.load(model_name, device=device, dtype=dtype)
    test = data.load_split(dataset, "test", limit=limit)
    fp = evaluate(fp_model, processor, test, batch_size=batch_size, progress=progress, model_name=model_name)
    rows = [dict(method="fp", config="FP", accuracy=fp["accuracy"], drop=0.0, search_seconds=0.0,
                 peak_memory_bytes=0, per_category=fp["per_category"])]
    for name in names:
        if name == "fp":
            continue
        m = methods.get(name)
        knobs = {"iters": iters} if iters and "iters" in {f.name for f in dataclasses.fields(m.config)} else {}
        for tag, qcfg in qcfgs:
            model = copy.deepcopy(fp_model)
            t0 = time.perf_counter()
            try:
                model, info = methods.quantize(model, processor, name, qcfg, calib_cfg, dataset=dataset,
                                               progress=progress, **knobs)
            except QVLMError as e:                 # e.g. a method that does not support a setting: shown, not hidden
                rows.append(dict(method=name, config=tag, error=str(e)))
                print(f"{name:12s} {tag:6s} ERROR {e}", file=sys.stderr)
                continue
            res = evaluate(model, processor, test, batch_size=batch_size, progress=progress, model_name=model_name)
            rows.append(dict(method=name, config=tag, accuracy=res["accuracy"],
                             drop=100 * (fp["accuracy"] - res["accuracy"]), search_seconds=info["search_seconds"],
                             peak_memory_bytes=info["peak_memory_bytes"], peak_memory_kind=info["peak_memory_kind"],
                             per_category=res["per_category"], knobs=info["knobs"],
                             wall_seconds=time.perf_counter() - t0))
            print(f"{name:12s} {tag:6s} acc {res['accuracy']:.4f}  drop {rows[-1]['drop']:+6.2f} pts  "
                  f"search {info['search_seconds']:7.1f} s", file=sys.stderr)
            del model
    return dict(model=model_name, dataset=dataset, n_eval=len(test), fp_accuracy=fp["accuracy"],
                configs=[t for t, _ in qcfgs], calib=dataclasses.asdict(calib_cfg), iters=iters or "method default",
                seed=seed, device=device, dtype=dtype, torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), rows=rows)


def to_markdown(res: dict) -> str:
    """Two tables: accuracy per method x config (drop vs FP in points), then the search cost."""
    cfgs = res["configs"]
    by = {(r["method"], r["config"]): r for r in res["rows"]}
    names = [n for n in dict.fromkeys(r["method"] for r in res["rows"]) if n != "fp"]
    cell = lambda r: ("error" if r is None or "error" in r                                  # noqa: E731
                      else f"{100 * r['accuracy']:.1f} ({-r['drop']:+.1f})")
    lines = [f"Testbed `{res['model']}`, {res['n_eval']} test samples, calibration {res['calib']['n_calib']} train "
             f"samples (seed {res['seed']}), iters {res['iters']}; {res['device']} {res['dtype']}, "
             f"torch {res['torch']}, "
             f"{res['threads']} threads. FP accuracy {100 * res['fp_accuracy']:.1f} %.", "",
             "Accuracy % (change vs FP in points)", "",
             "| method | " + " | ".join(cfgs) + " |", "|---|" + "---|" * len(cfgs)]
    lines += [f"| {n} | " + " | ".join(cell(by.get((n, c))) for c in cfgs) + " |" for n in names]
    lines += ["", "Search seconds (calibration + search)", "",
              "| method | " + " | ".join(cfgs) + " |", "|---|" + "---|" * len(cfgs)]
    sec = lambda r: "-" if r is None or "error" in r else f"{r['search_seconds']:.1f}"   # noqa: E731
    lines += [f"| {n} | " + " | ".join(sec(by.get((n, c))) for c in cfgs) + " |" for n in names]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--dataset", default="tiny")
    p.add_argument("--methods", default="", help="comma-separated names (default: every registered method)")
    p.add_argument("--configs", default=CONFIGS, help="comma-separated WxAy[Gg] tags")
    p.add_argument("--limit", type=int, default=0, help="first N test samples (0 = whole split)")
    p.add_argument("--calib", type=int, default=0, help="calibration samples (0 = CalibConfig default)")
    p.add_argument("--iters", type=int, default=0, help="steps of learned methods (0 = each method's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench"), help="directory for accuracy.md / accuracy.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = run(args.model, args.dataset, [n for n in args.methods.split(",") if n], args.configs, args.limit,
                  args.calib, args.iters, args.seed, args.device, args.dtype, args.batch_size, not args.no_progress)
    except QVLMError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    md = to_markdown(res)
    print(md)
    out = Path(args.out)
    atomic_write_json(out / "accuracy.json", res)
    atomic_write_text(out / "accuracy.md", md)
    print(f"wrote {out / 'accuracy.md'} and {out / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
