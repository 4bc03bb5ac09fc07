"""Deployment checks: every kernel against its torch reference and the fake-quant result, the integer accumulator
of a packed layer against the fake-quant integer matmul, and every packed layer against its fake-quant twin on the
input it saw (the layer-local contract of a deployed model). Also where stored GPU benchmark runs are read.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from torch import nn

import kernels
import kernels as kn
from kernels.testing import gemm_tolerance

from ..config import SCOPES
from ..core import quant
from ..errors import QVLMError
from ..models import llava
from ..paths import RESULTS_DIR


def kernel_checks(M: int = 37, N: int = 96, K: int = 256, group_size: int = 64, seed: int = 0,
                  device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """Each Triton kernel against its torch reference and against the fake-quant (qvlm.quant) fp32 result, on a
    ragged (M, N, K) problem. Rows: kernel, spec, max_abs_err vs fake-quant, tol (the kernels.testing bound; 0 =
    must be exact), ok, max_abs_err vs the torch *_ref. Needs CUDA or TRITON_INTERPRET=1 (QVLMError otherwise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)                                # (M, K) activations
    w = torch.randn(N, K, generator=g).to(device)                                       # (N, K) weight
    if not kn.can_launch(x):
        raise QVLMError("cannot launch the Triton kernels here (no CUDA, TRITON_INTERPRET unset)",
                        "set TRITON_INTERPRET=1 before importing kernels (notebook 06: INTERPRET=True)")
    rows = []

    def add(kernel, spec, got, fake, ref, tol):
        err = (got.double() - fake.double()).abs()
        tol_t = torch.as_tensor(tol, dtype=torch.float64, device=err.device)
        rows.append(dict(kernel=kernel, spec=spec, max_abs_err=float(err.max()), tol=float(tol_t.max()),
                         ok=bool((err <= tol_t).all()), max_abs_err_vs_ref=float((got.double() - ref.double()).abs().max())))

    codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8).to(device)
    packed = kn.pack_int4(codes, signed=True)
    add("unpack_int4", "pack_int4 inverse (codes)", kn.unpack_int4(packed, True), codes, kn.unpack_int4_ref(packed, True), 0)
    for a_bits, pack in ((8, False), (4, True)):
        q, s = kn.act_quant(x, a_bits, pack=pack)
        q_ref, s_ref = kn.act_quant_ref(x, a_bits, pack=pack)
        q_fake = quant.quantize_act(x, a_bits)[0]
        add(f"act_quant a{a_bits}", "qvlm.quant.quantize_act (codes)", kn.unpack_int4_ref(q, True) if pack else q,
            q_fake, kn.unpack_int4_ref(q_ref, True) if pack else q_ref, 0)
    w_hat4 = quant.fake_quant_weight(w, 4, group_size)                                  # (N, K) fp32
    pw4 = kn.pack_weight(w, 4, group_size)
    fake = x.float() @ w_hat4.T
    add("w4a16", "x @ fake_quant_weight(W).T", kn.w4a16_matmul(x, pw4.qweight, pw4.scale),
        fake, kn.w4a16_ref(x, pw4.qweight, pw4.scale), gemm_tolerance(fake, x.float(), w_hat4, dtype, dtype))
    for a_bits, w_bits, name in ((8, 8, "w8a8"), (4, 4, "w4a4")):
        pw = kn.pack_weight(w, w_bits, group_size)
        w_hat = quant.fake_quant_weight(w, w_bits, group_size)
        x_hat = quant.fake_quant_act(x.float(), a_bits)
        fake = x_hat @ w_hat.T
        tol = gemm_tolerance(fake, x_hat, w_hat, dtype)
        if name == "w8a8":
            a, s = kn.act_quant(x, 8)
            got = kn.w8a8_matmul(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            ref = kn.w8a8_ref(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            acc, acc_ref = kn.w8a8_int32(a, pw.qweight), kn.w8a8_int32_ref(a, pw.qweight)
        else:
            a, s = kn.act_quant(x, 4, pack=True)
            got = kn.w4a4_matmul(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            ref = kn.w4a4_ref(a, s, pw.qweight, pw.scale, out_dtype=dtype)
            acc, acc_ref = kn.w4a4_int32(a, pw.qweight), kn.w4a4_int32_ref(a, pw.qweight)
        add(name, "fake_quant_act(x) @ fake_quant_weight(W).T", got, fake, ref, tol)
        q_a = quant.quantize_act(x.float(), a_bits)[0].double()
        q_w = quant.quantize_weight(w, w_bits, group_size)[0].double()
        add(f"{name} int32", "quantize_act(x) @ quantize_weight(W).T (integers)", acc, q_a @ q_w.T, acc_ref, 0)
    return rows


def integer_accumulator(fake_layer, packed_layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel int32 accumulator, fake-quant integer matmul) of one layer for input x (M, K); equal exactly when
    deploy kept the layer's codes. Integer (w8a8 / w4a4) layers with the act_quant kernel and symmetric weights."""
    if packed_layer.mode == "w4a16" or packed_layer.act != "token" or not packed_layer.symmetric:
        raise QVLMError(f"integer_accumulator needs a symmetric integer layer with per-token activations, got "
                        f"{packed_layer.mode} / {packed_layer.act}", "pick a w8a8 or w4a4 layer")
    x = x.reshape(-1, fake_layer.in_features)
    x = fake_layer.prepare_input(x)
    pack = packed_layer.mode == "w4a4"
    if kn.can_launch(x):
        a, _ = kn.act_quant(x, packed_layer.a_bits, pack=pack)           # default tiles (CUDA: autotuned)
        acc = kn.w4a4_int32(a, packed_layer.qweight, True) if pack else kn.w8a8_int32(a, packed_layer.qweight)
    else:
        a, _ = kn.act_quant_ref(x, packed_layer.a_bits, pack=pack)
        acc = kn.w4a4_int32_ref(a, packed_layer.qweight, True) if pack else kn.w8a8_int32_ref(a, packed_layer.qweight)
    q_a = quant.quantize_act(x.float(), fake_layer.a_bits)[0].double()                       # (M, K)
    q_w = quant.quantize_weight(fake_layer.quant_weight().float(), fake_layer.w_bits, fake_layer.group_size,
                                True, fake_layer.w_scale, fake_layer.w_zero_point)[0].double()  # (N, K)
    return acc, (q_a @ q_w.T).round().to(torch.int32)


def gpu_bench_results(directory=None) -> list[dict]:
    """Stored `bench.kernels` GPU runs ({"meta": {device, date, ...}, "rows": [...]}), newest first; [] if none."""
    d = Path(directory) if directory else RESULTS_DIR / "gpu"
    runs = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    runs = [r for r in runs if isinstance(r, dict) and "meta" in r and "rows" in r]
    return sorted(runs, key=lambda r: r["meta"].get("date", ""), reverse=True)


# Samples run through the kernel-backed model per mode when the kernels run in the CPU interpreter (its cost is
# ~10 s per 16 testbed samples per scheme); on CUDA, or with the torch references, `n_eval` of the run is used.
INTERPRETER_EVAL = {"smoke": 16, "full": 64}


def packed_eval_size(mode: str, n_eval: int, device: str = "cpu") -> int:
    """How many test samples notebook 06 runs through the packed model (0 = the whole split)."""
    if not str(device).startswith("cuda") and kernels.INTERPRET:
        return INTERPRETER_EVAL[mode] if n_eval == 0 else min(n_eval, INTERPRETER_EVAL[mode])
    return n_eval


def largest_group_size(model: nn.Module, cap: int = 128, scope=None) -> int:
    """The largest even group size <= cap that divides the input width of every quantizable linear (0 if none)."""
    widths = {info.module.in_features for info in llava.linear_layers(model, scope or SCOPES)}
    g = functools.reduce(math.gcd, widths)
    return max((d for d in range(2, min(g, cap) + 1, 2) if g % d == 0), default=0)


LAYER_RTOL = {torch.float32: 1e-4}   # layer-local check: fp32 roundoff over K ~ 1e-7..1e-5 relative
LAYER_RTOL_HALF = 2e-2               # fp16 / bf16 outputs: one output rounding (~1e-3) plus accumulation order


def layer_rtol(dtype) -> float:
    """Tolerance of `layerwise_check`'s max_rel_err for a model computing in `dtype`."""
    return LAYER_RTOL.get(dtype, LAYER_RTOL_HALF)


LOCAL_ROWS = 64     # rows (tokens) of each layer's input kept for the layer-local check: bounded memory at 7B/13B


def _worst(outputs) -> dict:
    """outputs: (name, y_packed, y_fake) per layer -> the largest max |y_packed - y_fake| / max |y_fake|."""
    worst, worst_name, n = 0.0, "", 0
    for name, got, want in outputs:
        err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))
        n += 1
        if err >= worst:
            worst, worst_name = err, name
    return dict(n_layers=n, max_rel_err=worst, worst_layer=worst_name)


@torch.no_grad()
def layerwise_check(packed_model: nn.Module, local: dict) -> dict:
    """Every packed layer fed the exact input its fake-quant twin saw (`local`: name -> (x, y_fake)): max |y_packed -
    y_fake| / max |y_fake| over layers. This is the deterministic contract (same codes, same integers, fp roundoff
    only). End-to-end predictions are NOT bit-identical: a ~1e-6 roundoff difference can move a value across a 4-bit
    rounding boundary in a later layer, and that one-step flip propagates (see notebook 06, section 3)."""
    return _worst((name, packed_model.get_submodule(name)(x), y) for name, (x, y) in local.items())


@torch.no_grad()
def twin_check(packed_model: nn.Module, twins: dict, local: dict) -> dict:
    """The same contract read off the packed model's own pass (`local`: name -> (x, y_packed) recorded there): each
    fake-quant twin (the QuantLinear the layer was packed from, `twins`: name -> module) is fed that x in torch,
    rotated online by the packed layer's own FWHT where it has one (the Triton FWHT and the torch one differ in fp32
    summation order, which can move one activation code across a 4-bit rounding boundary: not the contract).
    No second pass through the kernels -- in the CPU interpreter every launch costs ~40 ms, whatever its size."""
    return _worst((name, y, twins[name](x, rotate=getattr(packed_model.get_submodule(name), "rotate", None)))
                  for name, (x, y) in local.items())
