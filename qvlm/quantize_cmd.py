"""`qvlm quantize`: quantize a model with a registered method, evaluate it on the test split, save it.

    qvlm quantize --model tiny --method gptq --w-bits 4 --a-bits 16 --group-size 32 --calib 64 --out runs/gptq-w4
    qvlm eval --model runs/gptq-w4                   # the saved directory reloads through qvlm.models.load

Defaults come from the dataclasses (QuantConfig, CalibConfig, the method's config), never from here. The output
directory is written atomically at the very end, so any failure (bad bits, a group size that does not divide a
width, an empty calibration set, NaN activations, an unknown method) leaves nothing behind; the error is one line
on stderr and the exit status is 2. The result JSON (--json) holds accuracy, per_category, method, w_bits, a_bits,
search_seconds (calibration + search wall time) and peak_memory_bytes (qvlm.calib.peak_memory: CUDA max allocated
on GPU, peak-RSS increase on CPU; `peak_memory_kind` says which).

`quantize` (the library function notebooks and bench call) is qvlm.methods.quantize, re-exported here.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .cli import add_common
from .config import SCOPES, CalibConfig, QuantConfig
from .errors import QVLMError
from .methods import quantize  # noqa: F401  (re-export: the library entry point)
from .qlinear import QUANT_META

RESULT_KEYS = ("method", "w_bits", "a_bits", "group_size", "search_seconds", "peak_memory_bytes", "peak_memory_kind",
               "quant_config", "knobs", "calib", "dataset")


def check_out_dir(out: str) -> Path:
    """--out must be new, empty, or an earlier quantized-model directory (it is replaced atomically)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / QUANT_META).is_file())):
        raise QVLMError(f"--out {out} exists and is not a quantized-model directory",
                        "pick a new directory (an earlier `qvlm quantize` output is replaced)")
    return path


def _quantize(args) -> int:
    from . import data, methods, models
    from .evaluate import evaluate
    from .qlinear import save_quantized
    from .utils import atomic_write_json, seed_everything

    method = methods.get(args.method)
    qcfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, group_size=args.group_size,
                       w_symmetric=not args.w_asym, a_symmetric=not args.a_asym, a_granularity=args.a_granularity,
                       weight_format=args.weight_format, scope=args.scope)
    calib_cfg = CalibConfig(n_calib=args.calib, batch_size=args.calib_batch_size, seed=args.seed)
    knobs = {}
    if args.iters:
        if args.iters < 0:
            raise QVLMError(f"--iters {args.iters} is negative", "pass a positive number (0 = the method's default)")
        if "iters" in {f.name for f in dataclasses.fields(method.config)}:
            knobs["iters"] = args.iters
        else:
            print(f"qvlm: note: --iters is ignored by method {method.name!r}", file=sys.stderr)
    from .methods import qvlm as qvlm_method      # Q-VLM's knobs: flags generated from QVLMConfig (R4)
    qvlm_knobs = qvlm_method.knobs_from_args(args)
    if method.name == "qvlm":
        knobs.update(qvlm_knobs)
    elif qvlm_knobs:
        print(f"qvlm: note: {', '.join(sorted(qvlm_knobs))} only apply to --method qvlm", file=sys.stderr)
    out = check_out_dir(args.out)
    if (Path(args.model) / QUANT_META).is_file():
        raise QVLMError(f"{args.model} is already a quantized model", "quantize the FP checkpoint it was made from")
    seed_everything(args.seed)
    model, processor = models.load(args.model, device=args.device, dtype=args.dtype)
    model, info = quantize(model, processor, method.name, qcfg, calib_cfg, dataset=args.dataset, progress=True,
                           **knobs)
    samples = data.load_split(args.dataset, "test", limit=args.limit)
    res = evaluate(model, processor, samples, batch_size=args.batch_size, model_name=args.model)
    result = {**res, **{k: info[k] for k in RESULT_KEYS}, "out": str(out), "split": "test", "blocks": info["blocks"]}
    method_info = {k: info[k] for k in RESULT_KEYS if k != "quant_config"}
    method_info.update(accuracy=res["accuracy"], eval_n=res["n"])
    base = args.model if args.model == "tiny" else str(Path(args.model).resolve())
    save_quantized(model, QuantConfig(**info["quant_config"]), method_info, out, processor=processor, base_model=base)
    print(f"{method.name} {qcfg.tag}: accuracy {res['accuracy']:.4f} (n={res['n']})  "
          f"search {info['search_seconds']:.1f} s  "
          f"peak memory {info['peak_memory_bytes'] / 2**20:.1f} MiB ({info['peak_memory_kind']})  -> {out}")
    for c, a in res["per_category"].items():
        print(f"  {c:<12s} {a:.4f}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `qvlm quantize` (called by qvlm.cli.build_parser)."""
    q, c = QuantConfig(), CalibConfig()
    p = subparsers.add_parser("quantize", help="quantize a model with a method, evaluate on test, save it")
    add_common(p)
    p.add_argument("--method", default="rtn", help="fp | rtn | smoothquant | gptq | awq | adaround | brecq | qvlm "
                                                   "(every name registered in qvlm.methods.METHODS)")
    p.add_argument("--w-bits", type=int, default=q.w_bits, help="weight bits: 2..8, or 16 = keep FP")
    p.add_argument("--a-bits", type=int, default=q.a_bits, help="activation bits: 2..8, or 16 = keep FP")
    p.add_argument("--group-size", type=int, default=q.group_size,
                   help="0 = per output channel, else a divisor of each width")
    p.add_argument("--w-asym", action="store_true", help="asymmetric weights (default symmetric)")
    p.add_argument("--a-asym", action="store_true", help="asymmetric activations (default symmetric)")
    p.add_argument("--a-granularity", default=q.a_granularity, choices=["token", "tensor"],
                   help="token: dynamic per-token ranges | tensor: static ranges calibrated on data")
    p.add_argument("--weight-format", default=q.weight_format, choices=["int", "nf4"])
    p.add_argument("--scope", default=",".join(q.scope), help=f"comma-separated subset of {','.join(SCOPES)}")
    p.add_argument("--calib", type=int, default=c.n_calib, help="calibration samples from the TRAIN split")
    p.add_argument("--calib-batch-size", type=int, default=c.batch_size)
    p.add_argument("--iters", type=int, default=0, help="optimisation steps of learned methods (0 = method default)")
    p.add_argument("--limit", type=int, default=0, help="evaluate on the first N test samples only (0 = all)")
    p.add_argument("--out", required=True, help="directory for the quantized model (written atomically)")
    from .methods import qvlm as qvlm_method      # one flag per QVLMConfig field (e.g. --p, --max-depth, --eta)
    qvlm_method.add_arguments(p)
    p.set_defaults(func=_quantize)
    return p
