"""`qvlm deploy DIR --out OUT`: pack a `qvlm quantize` directory for the Triton kernels, report its memory.
`qvlm export DIR --format compressed-tensors --out OUT`: the same directory as a compressed-tensors checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.checkpoint import QUANT_META, load_quantized, read_meta
from ..errors import QVLMError
from ..utils import atomic_write_json
from .checkpoint import PACKED_META, save_packed
from .export import EXPORT_META, FORMATS, export_compressed_tensors
from .layer import scheme
from .memory import memory_report
from .pack import deploy

def _check_dirs(args, marker: str, what: str) -> tuple[Path, Path]:
    """(src, out) after the checks both commands share: src is a `qvlm quantize` directory, out is new or an earlier
    output of the same command (its `marker` file present), never src itself."""
    src, out = Path(args.dir), Path(args.out)
    if not src.is_dir():
        raise QVLMError(f"{args.dir} not found (not a directory)", "pass a directory written by `qvlm quantize --out`")
    for done, kind in ((PACKED_META, "packed model"), (EXPORT_META, "compressed-tensors export")):
        if (src / done).is_file():
            raise QVLMError(f"{args.dir} is already a {kind}", "pass the `qvlm quantize` directory it came from")
    if not (src / QUANT_META).is_file():
        raise QVLMError(f"{args.dir} is not a quantized-model directory (no {QUANT_META})",
                        "create one with `qvlm quantize --model M --method rtn ... --out DIR`")
    if out.resolve() == src.resolve():
        raise QVLMError("--out is the input directory", f"write the {what} to a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise QVLMError(f"--out {args.out} exists and is not a {what} directory",
                        f"pick a new directory (an earlier {what} there is replaced)")
    return src, out


def _source(src: Path, qmeta: dict) -> dict:
    return dict(quantized_dir=str(src.resolve()), method=qmeta.get("method"), quant_config=qmeta.get("quant_config"),
                base_model=qmeta.get("base_model"))


def _deploy_cmd(args) -> int:
    src, out = _check_dirs(args, PACKED_META, "packed model")
    qmeta = read_meta(src)
    model, processor = load_quantized(src, dtype=qmeta.get("dtype", "float32"))
    deploy(model)                                          # raises (nothing written) on an unsupported scheme
    source = _source(src, qmeta)
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


def _export_cmd(args) -> int:
    src, out = _check_dirs(args, EXPORT_META, "compressed-tensors export")
    qmeta = read_meta(src)
    model, processor = load_quantized(src, dtype=qmeta.get("dtype", "float32"))
    summary = export_compressed_tensors(model, out, processor=processor, source=_source(src, qmeta))
    groups = ", ".join(f"{g['layers']} x {g['scheme']['format']}" for g in summary["groups"].values())
    print(f"exported {groups} -> {out} (compressed-tensors {summary['compressed_tensors']}; reloads through "
          f"transformers' from_pretrained with weights equal to the fake-quant weights bit for bit)")
    if args.json:
        atomic_write_json(args.json, summary)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `qvlm deploy` (called by qvlm.cli.build_parser)."""
    p = subparsers.add_parser("deploy", help="pack a `qvlm quantize` directory for the Triton kernels")
    p.add_argument("dir", help="a directory written by `qvlm quantize --out DIR`")
    p.add_argument("--out", required=True, help="directory for the packed model (written atomically)")
    p.add_argument("--json", default="", help="write the scheme and memory report as JSON to this path")
    p.set_defaults(func=_deploy_cmd)
    e = subparsers.add_parser("export", help="write a `qvlm quantize` directory as a compressed-tensors checkpoint")
    e.add_argument("dir", help="a directory written by `qvlm quantize --out DIR`")
    e.add_argument("--format", required=True, choices=list(FORMATS), help="checkpoint format")
    e.add_argument("--out", required=True, help="directory for the export (written atomically)")
    e.add_argument("--json", default="", help="write the export summary as JSON to this path")
    e.set_defaults(func=_export_cmd)
    return p
