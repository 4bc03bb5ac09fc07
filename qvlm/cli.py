"""Command line: `qvlm eval`, `qvlm quantize`, `qvlm run`, `qvlm deploy`, `qvlm export`.

    qvlm eval --model tiny --split test
    qvlm quantize --model tiny --method gptq --w-bits 4 --a-bits 16 --group-size 32 --calib 64 --out runs/gptq-w4
    qvlm eval --model runs/gptq-w4                       # a saved directory reloads through qvlm.loading.load
    qvlm run --model tiny --methods rtn,brecq,qvlm --settings W4A4,W6A6 --seeds 0,1,2 --iters 50 --json r.json
    qvlm deploy runs/gptq-w4 --out runs/gptq-w4-packed
    qvlm export runs/gptq-w4 --format compressed-tensors --out runs/gptq-w4-ct   # transformers / vLLM load it

Every method's knobs are flags generated from its config dataclass (`--max-depth 2`, `--eta 1.0`, ...; `qvlm
quantize --method qvlm --help` lists them with their documented defaults); a flag no selected method has is an
error. Defaults come from the dataclasses (QuantConfig, CalibConfig, EvalConfig, the method configs), never from
here. Output directories are written atomically at the very end: any failure leaves nothing behind. Expected
errors (QVLMError) print one line `qvlm: error: <problem> -- fix: <fix>` and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import experiments, loading, methods, transforms
from .config import SCOPES, CalibConfig, EvalConfig, QuantConfig, parse_settings
from .core.checkpoint import QUANT_META, save_quantized
from .core.quant import W_CLIPS
from .data import load_split
from .deploy import cli as deploy_cli
from .errors import QVLMError
from .evaluate import evaluate
from .report.stats import summarize
from .utils import atomic_write_json, seed_everything

RESULT_KEYS = ("method", "setting", "seed", "accuracy", "n_eval", "wall_s", "cpu_s", "linear_passes",
               "peak_memory_bytes", "peak_memory_kind", "knobs")
_TYPES = {"int": int, "float": float, "str": str}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_method_knobs(p: argparse.ArgumentParser, names: list[str], skip: tuple = ()) -> None:
    """One `--<knob>` flag per config field of the methods `names` (generated from their dataclasses); values land
    in `args.knobs` only when given (unset flags keep each method's documented default). `skip`: knobs the caller
    offers as its own flags."""
    seen = {}
    for name in names:
        m = methods.get(name)
        helps = m.knob_help()
        for f in dataclasses.fields(m.config):
            if f.name not in skip:
                seen.setdefault(f.name, (f, helps.get(f.name, f.name), []))[2].append(name)
    g = p.add_argument_group("method options (from each method's config dataclass)")
    for knob, (f, text, owners) in sorted(seen.items()):
        typ = _bool if str(f.type) == "bool" else _TYPES.get(str(f.type), str)
        g.add_argument(f"--{knob.replace('_', '-')}", dest=f"knob__{knob}", type=typ, default=None,
                       metavar="{true,false}" if typ is _bool else knob.upper(),
                       help=f"{text} (default {f.default!r}; {', '.join(owners)})")


def knobs_from_args(args: argparse.Namespace) -> dict:
    return {k[len("knob__"):]: v for k, v in vars(args).items() if k.startswith("knob__") and v is not None}


def add_common(p: argparse.ArgumentParser) -> None:
    e = EvalConfig()
    p.add_argument("--model", default="tiny", help="'tiny' (shipped testbed), or a local llava-hf checkpoint dir")
    p.add_argument("--dataset", default=e.dataset, help="'tiny' (synthetic) or a local ScienceQA parquet directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=e.batch_size)
    p.add_argument("--seed", type=int, default=CalibConfig().seed)
    p.add_argument("--json", default="", help="write results as JSON to this path")


def add_quant(p: argparse.ArgumentParser) -> None:
    q, c = QuantConfig(), CalibConfig()
    p.add_argument("--w-bits", type=int, default=q.w_bits, help="weight bits: 2..8, or 16 = keep FP")
    p.add_argument("--a-bits", type=int, default=q.a_bits, help="activation bits: 2..8, or 16 = keep FP")
    p.add_argument("--group-size", type=int, default=q.group_size,
                   help="0 = per output channel, else a divisor of each width")
    p.add_argument("--w-asym", action="store_true", help="asymmetric weights (default symmetric)")
    p.add_argument("--w-clip", default=q.w_clip, choices=list(W_CLIPS),
                   help="weight ranges: minmax | mse (per-group clip-ratio search, data-free)")
    p.add_argument("--a-asym", action="store_true", help="asymmetric activations (default symmetric)")
    p.add_argument("--a-granularity", default=q.a_granularity, choices=["token", "tensor"],
                   help="token: dynamic per-token ranges | tensor: static ranges calibrated on data")
    p.add_argument("--weight-format", default=q.weight_format, choices=["int", "nf4"])
    p.add_argument("--scope", default=",".join(q.scope), help=f"comma-separated subset of {','.join(SCOPES)}")
    p.add_argument("--calib", type=int, default=c.n_calib, help="calibration samples from the TRAIN split")
    p.add_argument("--calib-batch-size", type=int, default=c.batch_size)
    p.add_argument("--limit", type=int, default=EvalConfig().n_eval,
                   help="evaluate on the first N test samples only (0 = all)")
    p.add_argument("--transform", default="none", choices=list(transforms.TRANSFORMS),
                   help="equivalence transform applied to the FP model before the method (qvlm.transforms)")


def _qcfg(args) -> QuantConfig:
    return QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, group_size=args.group_size,
                       w_symmetric=not args.w_asym, a_symmetric=not args.a_asym, a_granularity=args.a_granularity,
                       weight_format=args.weight_format, scope=args.scope, w_clip=args.w_clip)


def _calib(args) -> CalibConfig:
    return CalibConfig(n_calib=args.calib, batch_size=args.calib_batch_size, seed=args.seed)


def _eval_cfg(args, split: str = "test") -> EvalConfig:
    return EvalConfig(dataset=args.dataset, split=split, n_eval=args.limit, batch_size=args.batch_size)


# ------------------------------------------------------------------------------------------------ commands
def _eval(args) -> int:
    seed_everything(args.seed)
    model, processor = loading.load(args.model, device=args.device, dtype=args.dtype)
    samples = load_split(args.dataset, args.split, limit=args.limit)
    res = evaluate(model, processor, samples, batch_size=args.batch_size, model_name=args.model)
    res["split"] = args.split
    print(f"accuracy {res['accuracy']:.4f}  (n={res['n']}, split={args.split}, model={args.model})")
    for c, a in res["per_category"].items():
        print(f"  {c:<12s} {a:.4f}")
    if args.json:
        atomic_write_json(args.json, res)
    return 0


def check_out_dir(out: str) -> Path:
    """--out must be new, empty, or an earlier quantized-model directory (it is replaced atomically)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / QUANT_META).is_file())):
        raise QVLMError(f"--out {out} exists and is not a quantized-model directory",
                        "pick a new directory (an earlier `qvlm quantize` output is replaced)")
    return path


def _quantize(args) -> int:
    method = methods.get(args.method)
    qcfg, calib = _qcfg(args), _calib(args)
    out = check_out_dir(args.out)
    if (Path(args.model) / QUANT_META).is_file():
        raise QVLMError(f"{args.model} is already a quantized model", "quantize the FP checkpoint it was made from")
    model, processor = loading.load(args.model, device=args.device, dtype=args.dtype)
    row = experiments.run_one(model, processor, method.name, qcfg, args.seed, calib=calib, eval=_eval_cfg(args),
                              knobs=knobs_from_args(args), model_name=args.model, progress=True, keep_model=True,
                              transform=args.transform)
    qmodel = row.pop("model_object")
    used = QuantConfig(**row["info"]["quant_config"])          # what ran (the fp method keeps 16 bits)
    record = {k: row[k] for k in RESULT_KEYS}
    record.update(quant_config=dataclasses.asdict(used), calib=row["info"]["calib"], dataset=args.dataset,
                  transform=row["info"]["transform"],
                  w_bits=used.w_bits, a_bits=used.a_bits, group_size=used.group_size, search_seconds=row["wall_s"],
                  per_category={k[4:]: v for k, v in row.items() if k.startswith("acc_")})
    base = args.model if args.model in loading.models.SHIPPED else str(Path(args.model).resolve())
    save_quantized(qmodel, used, record, out, processor=processor, base_model=base)
    print(f"{method.name} {qcfg.setting}: accuracy {row['accuracy']:.4f} (n={row['n_eval']})  "
          f"search {row['wall_s']:.1f} s ({row['cpu_s']:.1f} CPU s, {row['linear_passes']} linear passes)  "
          f"peak memory {row['peak_memory_bytes'] / 2**20:.1f} MiB ({row['peak_memory_kind']})  -> {out}")
    for k in sorted(k for k in row if k.startswith("acc_")):
        print(f"  {k[4:]:<12s} {row[k]:.4f}")
    if args.json:
        atomic_write_json(args.json, {**record, "out": str(out), "split": "test", "blocks": row["info"]["blocks"]})
    return 0


def _run(args) -> int:
    names = [n for n in args.methods.split(",") if n]
    settings = parse_settings(args.settings)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    model, processor = loading.load(args.model, device=args.device, dtype=args.dtype)
    rows = experiments.grid(model, processor, names, settings, seeds, knobs=knobs_from_args(args),
                            calib=_calib(args), eval=_eval_cfg(args), model_name=args.model, transform=args.transform)
    table = summarize([r for r in rows if "error" not in r])
    print(table.to_string(index=False))
    for r in rows:
        if "error" in r:
            print(f"{r['method']} {r['setting']}: error: {r['error']}", file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, dict(rows=[{k: v for k, v in r.items() if k != "info"} for r in rows],
                                          summary=table.to_dict("records")))
    return 0


# ------------------------------------------------------------------------------------------------ parser
def selected_methods(argv: list[str]) -> list[str]:
    """The methods a command line names (--method X / --methods a,b), read before the full parse so that only
    their knobs become flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--methods", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.methods is not None:
        return [n for n in known.methods.split(",") if n]
    return [known.method or "rtn"]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="qvlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("eval", help="evaluate a model (FP, quantized or packed directory) on a split")
    add_common(p)
    p.add_argument("--split", default=EvalConfig().split, choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=EvalConfig().n_eval, help="first N samples only (0 = all)")
    p.set_defaults(func=_eval)
    chosen = [n.split("+")[0] for n in selected_methods(argv) if n.split("+")[0] in methods.METHODS]  # qvlm+rotate
    p = sub.add_parser("quantize", help="quantize a model with a method, evaluate on test, save it")
    add_common(p)
    add_quant(p)
    p.add_argument("--method", default="rtn", help=f"one of {', '.join(methods.METHODS)}")
    p.add_argument("--out", required=True, help="directory for the quantized model (written atomically)")
    add_method_knobs(p, chosen[:1] or ["rtn"])
    p.set_defaults(func=_quantize)
    p = sub.add_parser("run", help="methods x settings x seeds with the experiment runner; mean +- std table")
    add_common(p)
    add_quant(p)
    p.add_argument("--methods", default="rtn", help=f"comma-separated, from {', '.join(methods.METHODS)}; "
                   "METHOD+TRANSFORM runs a method on its own transform (e.g. qvlm+rotate)")
    p.add_argument("--settings", default="W4A4", help="comma-separated WxAy[Gg] labels, e.g. W4A4,W6A6,W4A16G32")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated calibration seeds")
    add_method_knobs(p, chosen or ["rtn"])
    p.set_defaults(func=_run)
    deploy_cli.add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except QVLMError as e:
        print(f"qvlm: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.cmd == "quantize":
            methods.get(args.method)                # unknown method: one line, before anything is loaded
        if args.cmd == "run":
            for n in args.methods.split(","):
                experiments.variant(n)              # a method, or method+transform (qvlm+rotate)
        return args.func(args)
    except QVLMError as e:
        print(f"qvlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
