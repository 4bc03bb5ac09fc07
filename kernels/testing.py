"""Comparison helpers for kernel checks (tests/kernels, notebook 06): explicit tolerances, and on failure *where*.

Tolerances are bounds derived from the arithmetic, not tuned constants. For a GEMM output y = sum_k a_k * b_k that
is compared with an fp32 reference r (e.g. fake_quant_act(x) @ fake_quant_weight(W).T):

    |y - r| <= 2 * u_out * |r|                 final rounding of y (and of r, when r is itself rounded) to out dtype
             + u_op * mag                      operands rounded to the MMA dtype (W4A16 dequantized weights)
             + K * u_fp32 * mag                fp32 accumulation / rescale order (a worst-case (K-1)u bound)

with mag = |a| @ |b|.T and u the unit roundoff (fp16 2^-11, bf16 2^-8, fp32 2^-24). Integer accumulators are
compared exactly.

References: micrograd `test/test_engine.py` (same expression through two implementations, explicit tol);
Triton-Puzzles (print torch.isclose maps on failure); Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1.
"""
from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}


def gemm_tolerance(ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
                   operand_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Elementwise bound on |y - ref| for y = a @ b.T computed with fp32 accumulation (see module docstring)."""
    mag = a.double().abs() @ b.double().abs().T                                # (M, N)
    K = a.shape[-1]
    tol = 2 * UNIT_ROUNDOFF[out_dtype] * ref.double().abs() + K * UNIT_ROUNDOFF[torch.float32] * mag
    if operand_dtype is not None and operand_dtype != torch.float32:
        tol = tol + UNIT_ROUNDOFF[operand_dtype] * mag
    return tol


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float = 0.0,
                    max_items: int = 8) -> str:
    """'' when |actual - expected| <= tol everywhere, else a short report: count, rows / columns hit, first items."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    t = torch.as_tensor(tol, dtype=torch.float64).cpu().expand_as(e)
    bad = ~((a - e).abs() <= t)                                                 # NaN counts as bad
    if not bad.any():
        return ""
    idx = bad.nonzero()
    lines = [f"{int(bad.sum())} / {bad.numel()} elements outside tolerance "
             f"(max |diff| {float((a - e).abs().max()):.4g}, shape {tuple(e.shape)})"]
    if e.dim() == 2:   # a ragged-edge bug shows up as whole rows / columns: list them
        lines.append(f"rows hit: {sorted(set(idx[:, 0].tolist()))[:20]}  cols hit: {sorted(set(idx[:, 1].tolist()))[:20]}")
    for i in idx[:max_items].tolist():
        i = tuple(i)
        lines.append(f"  at {i}: got {a[i]:.6g}, expected {e[i]:.6g}, tol {t[i]:.3g}")
    return "\n".join(lines)


def assert_close_where(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float = 0.0,
                       what: str = "") -> None:
    """Assert |actual - expected| <= tol (elementwise; 0 = exact), failing with a report of where they differ."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    report = mismatch_report(actual, expected, tol)
    assert not report, f"{what}: {report}"
