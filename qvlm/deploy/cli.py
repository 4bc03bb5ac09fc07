"""`qvlm deploy DIR --out OUT`: pack a `qvlm quantize` directory for the Triton kernels, report its memory."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.checkpoint import QUANT_META, load_quantized, read_meta
from ..errors import QVLMError
from ..utils import atomic_write_json
from .checkpoint import PACKED_META, save_packed
from .layer import scheme
from .memory import memory_report
from .pack import deploy

def _deploy_cmd(args) -> int:
    src, out = Path(args.dir), Path(args.out)
    if not src.is_dir():
        raise QVLMError(f"{args.dir} not found (not a directory)", "pass a directory written by `qvlm quantize --out`")
    if (src / PACKED_META).is_file():
        raise QVLMError(f"{args.dir} is already a packed model", "pass the `qvlm quantize` directory it came from")
    if not (src / QUANT_META).is_file():
        raise QVLMError(f"{args.dir} is not a quantized-model directory (no {QUANT_META})",
                        "create one with `qvlm quantize --model M --method rtn ... --out DIR`")
    if out.resolve() == src.resolve():
        raise QVLMError("--out is the input directory", "write the packed model to a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PACKED_META).is_file())):
        raise QVLMError(f"--out {args.out} exists and is not a packed-model directory",
                        "pick a new directory (an earlier `qvlm deploy` output is replaced)")
    qmeta = read_meta(src)
    model, processor = load_quantized(src, dtype=qmeta.get("dtype", "float32"))
    deploy(model)                                          # raises (nothing written) on an unsupported scheme
    source = dict(quantized_dir=str(src.resolve()), method=qmeta.get("method"), quant_config=qmeta.get("quant_config"),
                  base_model=qmeta.get("base_model"))
    save_packed(model, out, processor=processor, source=source)
    rep = memory_report(model, out)
    sch = scheme(model)
    lin, tot = rep["linear"], rep["total"]
    print(f"packed {sch['layers']} linears ({sch['name']}; kernels {sch['kernels']}) -> {out}")
    print(f"  linear weights {lin['bytes'] / 2**20:.2f} MiB = {lin['fraction']:.3f}x FP16 ({lin['ratio']:.2f}x smaller);"
          f" whole model {tot['bytes'] / 2**20:.2f} MiB = {tot['fraction']:.3f}x FP16; on disk "
          f"{rep['disk']['dir_bytes'] / 2**20:.2f} MiB")
    for note in model.qvlm_deploy["notes"]:
        print(f"  note: {note}")
    if args.json:
        atomic_write_json(args.json, dict(out=str(out), scheme=sch, memory=rep, notes=model.qvlm_deploy["notes"],
                                          source=source))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `qvlm deploy` (called by qvlm.cli.build_parser)."""
    p = subparsers.add_parser("deploy", help="pack a `qvlm quantize` directory for the Triton kernels")
    p.add_argument("dir", help="a directory written by `qvlm quantize --out DIR`")
    p.add_argument("--out", required=True, help="directory for the packed model (written atomically)")
    p.add_argument("--json", default="", help="write the scheme and memory report as JSON to this path")
    p.set_defaults(func=_deploy_cmd)
    return p
