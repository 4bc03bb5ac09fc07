"""Benchmark the deployment kernels (W4A16, W8A8, W4A4) against torch fp16 matmul at LLaVA linear-layer shapes.

    python -m bench.kernels                          # GPU: LLaVA-1.5 7B + 13B shapes, M = 1, 16, 600, 2048
    python -m bench.kernels --kernels w4a4 --m 1,16  # a subset
    python -m kernels.w4a16                          # the same, W4A16 only (each kernel file's __main__)

Run it as a module from the repository root: `python bench/kernels.py` would put bench/ first on sys.path, where
this file's own name shadows the `kernels` package.

Shapes (K, N) are the linears of the LLaVA-1.5 language models (Vicuna / LLaMA-2):
    7B : q/k/v/o (4096, 4096), gate/up (4096, 11008), down (11008, 4096)
    13B: q/k/v/o (5120, 5120), gate/up (5120, 13824), down (13824, 5120)
M is the number of tokens in the GEMM: 1 and 16 = decode (batch 1 / 16), 600 ~ one LLaVA-1.5 prompt (576 image
tokens + text) at prefill, 2048 = a long prefill.
Fused (qvlm.deploy.fuse): q|k|v (3 x (K, K)) and gate|up (2 x (K, N_mlp)) as separate calls vs one GEMM over the
concatenated weights, fp16 and each kernel end to end (`--no-fused` skips it).

Every (shape, M) point times torch fp16 `F.linear` and the kernels side by side in the same process with
`triton.testing.do_bench(..., quantiles=[0.5, 0.2, 0.8])` (median, 20th and 80th percentile, ms); speed-up =
fp16 median / kernel median. The integer kernels are timed twice: GEMM only (activations already quantized) and
end to end (per-token activation quantization kernel + GEMM). Kernels are called once before timing (warm-up:
compilation and autotuning are excluded). Results go to <out>/kernels_bench-<device>-<date>.csv and .json, with the
device, date, library versions, dtype and group sizes recorded in both.

On a machine without a GPU this runs the kernels in Triton's CPU interpreter at tiny shapes, only to show that the
script works: those timings mean nothing.

References: Triton tutorial 03-matrix-multiplication (`triton.testing` benchmark with quantiles); gpt-fast README
(state the GPU, dtype and batch size with every number).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.exit("run this benchmark as a module from the repository root: python -m bench.kernels")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before importing kernels / triton.jit

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402
from kernels import act_quant, pack_weight, w4a4_matmul, w4a16_matmul, w8a8_matmul  # noqa: E402
from qvlm.utils import atomic_write_json, atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAVA_SHAPES = {                                        # (K, N) = (in_features, out_features)
    "llava-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llava-13b": [(5120, 5120), (5120, 13824), (13824, 5120)],
}
GPU_M = (1, 16, 600, 2048)
CPU_SHAPES = {"tiny": [(256, 128), (128, 256)]}         # interpreter: tiny, just to exercise the script
CPU_M = (1, 16)
QUANTILES = [0.5, 0.2, 0.8]
KERNELS = ("w4a16", "w8a8", "w4a4")


def gpu_timer(fn) -> list[float]:
    """[median, p20, p80] in ms, CUDA events via triton.testing.do_bench."""
    return list(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=QUANTILES))


def cpu_timer(fn, reps: int = 3) -> list[float]:
    """[median, p20, p80] in ms of wall-clock time (interpreter: meaningless, only exercises the code)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return [statistics.median(ts), ts[0], ts[-1]]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref||: a sanity column (quantization error vs fp16), not a correctness test."""
    return float((y.float() - ref).norm() / ref.norm())


def bench_point(model: str, K: int, N: int, M: int, which: tuple, w4a16_group: int, int_group: int,
                timer, device: str) -> list[dict]:
    """Time fp16 and the selected kernels at one (K, N, M), side by side. Returns one row per method."""
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=torch.float16)
    w = torch.randn(N, K, device=device, dtype=torch.float16) * K ** -0.5            # (N, K), unit-scale outputs
    ref = F.linear(x, w).float()
    methods = {"fp16": lambda: F.linear(x, w)}
    if "w4a16" in which:
        pw = pack_weight(w.float(), 4, w4a16_group, symmetric=True)
        methods["w4a16"] = lambda: w4a16_matmul(x, pw.qweight, pw.scale, None, True)
    if "w8a8" in which:
        p8 = pack_weight(w.float(), 8, int_group, symmetric=True)
        a8, s8 = act_quant(x, 8)
        methods["w8a8_gemm"] = lambda: w8a8_matmul(a8, s8, p8.qweight, p8.scale, None, torch.float16)
        methods["w8a8_e2e"] = lambda: w8a8_matmul(*act_quant(x, 8), p8.qweight, p8.scale, None, torch.float16)
    if "w4a4" in which:
        p4 = pack_weight(w.float(), 4, int_group, symmetric=True)
        a4, s4 = act_quant(x, 4, pack=True)
        methods["w4a4_gemm"] = lambda: w4a4_matmul(a4, s4, p4.qweight, p4.scale, None, True, torch.float16)
        methods["w4a4_e2e"] = lambda: w4a4_matmul(*act_quant(x, 4, pack=True), p4.qweight, p4.scale, None, True,
                                                  torch.float16)
    rows, fp16_ms = [], None
    for name, fn in methods.items():
        err = rel_err(fn(), ref)                         # warm-up: compile + autotune happen here, not in timing
        ms, p20, p80 = timer(fn)
        fp16_ms = ms if name == "fp16" else fp16_ms
        rows.append({"model": model, "K": K, "N": N, "M": M, "method": name,
                     "ms_median": round(ms, 5), "ms_p20": round(p20, 5), "ms_p80": round(p80, 5),
                     "speedup_vs_fp16": round(fp16_ms / ms, 3), "tflops": round(2 * M * N * K / (ms * 1e9), 3),
                     "rel_err_vs_fp16": round(err, 4)})
    return rows


def bench_fused(model: str, K: int, widths: tuple, M: int, which: tuple, w4a16_group: int, int_group: int, timer,
                device: str) -> list[dict]:
    """Linears that read one tensor (q|k|v: widths (K, K, K); gate|up: (N, N)) as separate calls vs ONE fused GEMM
    over the concatenated weights (qvlm.deploy.fuse), for fp16 and each selected kernel end to end (the fused call
    quantizes the activation once). speedup_vs_fp16 compares like with like: separate vs fp16 separate, fused vs
    fp16 fused; the fused/separate ratio of each method is what fusing buys."""
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=torch.float16)
    ws = [torch.randn(n, K, device=device, dtype=torch.float16) * K ** -0.5 for n in widths]
    w_cat = torch.cat(ws)
    ref = F.linear(x, w_cat).float()
    tag = "qkv" if len(widths) == 3 else "gate_up"
    methods = {f"fp16[{tag}]": (lambda: torch.cat([F.linear(x, w) for w in ws], -1)),
               f"fp16[{tag} fused]": (lambda: F.linear(x, w_cat))}
    for kern in which:
        bits = 8 if kern == "w8a8" else 4
        group = w4a16_group if kern == "w4a16" else int_group
        parts = [pack_weight(w.float(), bits, group, symmetric=True) for w in ws]
        whole = pack_weight(w_cat.float(), bits, group, symmetric=True)
        if kern == "w4a16":
            call = lambda p: w4a16_matmul(x, p.qweight, p.scale, None, True)                 # noqa: E731
        elif kern == "w8a8":
            call = lambda p: w8a8_matmul(*act_quant(x, 8), p.qweight, p.scale, None, torch.float16)  # noqa: E731
        else:
            call = lambda p: w4a4_matmul(*act_quant(x, 4, pack=True), p.qweight, p.scale, None, True,  # noqa: E731
                                         torch.float16)
        methods[f"{kern}_e2e[{tag}]"] = lambda call=call, parts=parts: torch.cat([call(p) for p in parts], -1)
        methods[f"{kern}_e2e[{tag} fused]"] = lambda call=call, whole=whole: call(whole)
    rows, base = [], {}
    for name, fn in methods.items():
        err = rel_err(fn(), ref)                         # warm-up
        ms, p20, p80 = timer(fn)
        layout = "fused" if "fused" in name else "separate"
        base.setdefault(layout, ms)                      # the fp16 row of each layout comes first
        rows.append({"model": model, "K": K, "N": sum(widths), "M": M, "method": name,
                     "ms_median": round(ms, 5), "ms_p20": round(p20, 5), "ms_p80": round(p80, 5),
                     "speedup_vs_fp16": round(base[layout] / ms, 3),
                     "tflops": round(2 * M * sum(widths) * K / (ms * 1e9), 3), "rel_err_vs_fp16": round(err, 4)})
    return rows


def device_info() -> dict:
    """What the numbers were measured on (stated beside every result)."""
    if torch.cuda.is_available():
        name, backend = torch.cuda.get_device_name(), "cuda"
    else:
        name, backend = f"CPU ({platform.processor() or platform.machine()}) Triton interpreter", "interpreter"
    return {"device": name, "backend": backend, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "activation_dtype": "float16", "output_dtype": "float16"}


def write_results(rows: list[dict], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    """CSV (one row per method and point, with device and date columns) + JSON (meta + rows)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()[:40]
    stem = out_dir / f"kernels_bench-{slug}-{meta['date'][:10]}"
    buf = io.StringIO()
    fields = ["device", "date"] + list(rows[0])
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({"device": meta["device"], "date": meta["date"], **r})
    atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())
    atomic_write_json(stem.with_suffix(".json"), {"meta": meta, "rows": rows})
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def print_table(rows: list[dict]) -> None:
    print(f"{'model':>10} {'K':>6} {'N':>6} {'M':>5} {'method':>10} {'ms (p20-p80)':>24} {'x fp16':>7} {'TFLOPS':>7}"
          f" {'relerr':>7}")
    for r in rows:
        spread = f"{r['ms_median']:.4f} ({r['ms_p20']:.4f}-{r['ms_p80']:.4f})"
        print(f"{r['model']:>10} {r['K']:>6} {r['N']:>6} {r['M']:>5} {r['method']:>10} {spread:>24} "
              f"{r['speedup_vs_fp16']:>7.2f} {r['tflops']:>7.2f} {r['rel_err_vs_fp16']:>7.4f}")


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI entry point; returns the rows."""
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma list of w4a16,w8a8,w4a4")
    p.add_argument("--models", default=",".join(LLAVA_SHAPES), help="comma list of llava-7b,llava-13b (GPU)")
    p.add_argument("--m", default=",".join(map(str, GPU_M if on_gpu else CPU_M)), help="comma list of token counts")
    p.add_argument("--w4a16-group-size", type=int, default=128, help="W4A16 weight group size (0 = per channel)")
    p.add_argument("--int-group-size", type=int, default=0, help="W8A8 / W4A4 weight group size (0 = per channel)")
    p.add_argument("--out", default=str(REPO / "results" / ("gpu" if on_gpu else "cpu-interpreter")),
                   help="output directory for the CSV and JSON")
    p.add_argument("--no-fused", action="store_true", help="skip the fused q|k|v and gate|up comparison")
    args = p.parse_args(argv)
    which = tuple(k for k in args.kernels.split(",") if k)
    assert set(which) <= set(KERNELS), f"unknown kernels {which}; choose from {KERNELS}"
    ms = [int(m) for m in args.m.split(",")]

    if on_gpu:
        shapes = {m: LLAVA_SHAPES[m] for m in args.models.split(",")}
        timer, device = gpu_timer, "cuda"
    else:
        if not kernels.INTERPRET:
            sys.exit("no GPU and kernels were imported without TRITON_INTERPRET=1: run `TRITON_INTERPRET=1 python "
                     "bench/kernels.py`")
        print("=" * 100 + "\nNO GPU: running the Triton CPU interpreter at tiny shapes. These timings MEAN NOTHING "
              "(numpy emulation);\nthey only show that the benchmark runs. Run on a GPU for real numbers.\n" + "=" * 100)
        torch.set_num_threads(1)
        shapes, timer, device = CPU_SHAPES, cpu_timer, "cpu"

    meta = {**device_info(), "kernels": list(which), "M": ms, "shapes": shapes, "quantiles": QUANTILES,
            "w4a16_group_size": args.w4a16_group_size, "int_group_size": args.int_group_size,
            "weights": "symmetric", "activations": "dynamic per-token symmetric",
            "timer": "triton.testing.do_bench (CUDA events)" if on_gpu else "time.perf_counter (interpreter)"}
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | fp16 activations | "
          f"W4A16 group {args.w4a16_group_size}, W8A8/W4A4 group {args.int_group_size}")
    rows = []
    for model, kn in shapes.items():
        for K, N in kn:
            for M in ms:
                rows += bench_point(model, K, N, M, which, args.w4a16_group_size, args.int_group_size, timer, device)
    if not args.no_fused:                                 # q|k|v = 3 x (K, K), gate|up = 2 x (K, N_mlp)
        for model, kn in shapes.items():
            (K, _), (_, n_mlp) = kn[0], kn[1]
            for widths in ((K, K, K), (n_mlp, n_mlp)):
                for M in ms:
                    rows += bench_fused(model, K, widths, M, which, args.w4a16_group_size, args.int_group_size,
                                        timer, device)
    print_table(rows)
    csv_path, json_path = write_results(rows, meta, Path(args.out))
    print(f"wrote {csv_path} and {json_path}")
    return rows


if __name__ == "__main__":
    main()
