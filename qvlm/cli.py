"""Command line: `qvlm eval`, `qvlm quantize`, `qvlm deploy`.

Expected errors (QVLMError) print one line `qvlm: error: <problem> -- fix: <fix>` and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import QVLMError


def _eval(args) -> int:
    from . import data, evaluate, models
    from .utils import atomic_write_json, seed_everything

    seed_everything(args.seed)
    model, processor = models.load(args.model, device=args.device, dtype=args.dtype)
    samples = data.load_split(args.dataset, args.split, limit=args.limit)
    res = evaluate.evaluate(model, processor, samples, batch_size=args.batch_size, model_name=args.model)
    res["split"] = args.split
    print(f"accuracy {res['accuracy']:.4f}  (n={res['n']}, split={args.split}, model={args.model})")
    for c, a in res["per_category"].items():
        print(f"  {c:<12s} {a:.4f}")
    if args.json:
        atomic_write_json(args.json, res)
    return 0


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (shipped testbed) or a local llava-hf checkpoint dir")
    p.add_argument("--dataset", default="tiny", help="'tiny' (synthetic) or a local ScienceQA parquet directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write results as JSON to this path")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("eval", help="evaluate a model (FP, or a quantized model directory) on a split")
    add_common(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=0, help="first N samples only (0 = all)")
    p.set_defaults(func=_eval)
    # Further sub-commands register themselves here (quantize, deploy).
    for mod in ("quantize_cmd", "deploy"):
        try:
            m = __import__(f"qvlm.{mod}", fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if e.name != f"qvlm.{mod}":
                raise
            continue
        m.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except QVLMError as e:
        print(f"qvlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
