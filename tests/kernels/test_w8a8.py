"""W8A8 kernel: exact int32 accumulator vs the integer matmul of qvlm.core.quant codes, and the rescaled output vs
its torch reference and vs fake_quant_act(x) @ fake_quant_weight(W).T (fp32).

Tolerances (kernels.testing.gemm_tolerance): integer sums are exact; the per-group rescale and the reference's
fp32 matmul each add at most ~K * 2^-24 * |x_hat| @ |W_hat|.T, and the output is rounded once (2 * u_out * |ref|).
"""
import pytest
import torch

from kernels import act_quant, pack_weight, w8a8_int32, w8a8_int32_ref, w8a8_matmul, w8a8_ref
from kernels.testing import assert_close_where, gemm_tolerance
from qvlm.core.quant import fake_quant_act, fake_quant_weight, quantize_act, quantize_weight

SHAPES = [(M, K, N) for M in (1, 3, 16, 37) for K in (64, 96, 200) for N in (48, 130)]
BLOCK = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32}                 # BLOCK_K 32: the smallest int8 MMA K


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_int32_accumulator_exact(M, K, N, device):
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device)
    q_a, _, _ = quantize_act(x, 8)                                    # (M, K) int8 codes
    q_w, _, _ = quantize_weight(w, 8, 0, True)                        # (N, K) int8 codes
    acc = w8a8_int32(q_a, q_w, block=BLOCK)
    assert acc.dtype == torch.int32
    assert_close_where(acc, q_a.double() @ q_w.double().T, what="int32 vs codes matmul")
    assert_close_where(acc, w8a8_int32_ref(q_a, q_w), what="int32 vs reference")


def test_int32_extremes(device):
    # largest magnitudes: -128 * -128 summed over K stays exact in int32
    q_a = torch.full((3, 200), -128, dtype=torch.int8, device=device)
    q_w = torch.full((5, 200), -128, dtype=torch.int8, device=device)
    q_w[1] = 127
    acc = w8a8_int32(q_a, q_w, block=BLOCK)
    assert_close_where(acc, q_a.double() @ q_w.double().T, what="extremes")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w_bits,group_size,symmetric", [
    (8, 0, True), (8, 32, False), (4, 32, True), (6, 0, False)])     # 8-bit asymmetric: shifted codes
@pytest.mark.parametrize("M,K,N", [(37, 96, 130), (1, 64, 48)])
def test_rescaled(M, K, N, w_bits, group_size, symmetric, out_dtype, device):
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device)
    a_q, a_scale = act_quant(x, 8)
    pw = pack_weight(w, w_bits, group_size, symmetric, container_bits=8)   # int8 codes, whatever w_bits
    w_zero = None if symmetric else pw.zero_point
    y = w8a8_matmul(a_q, a_scale, pw.qweight, pw.scale, w_zero, out_dtype=out_dtype, block=BLOCK)
    assert y.dtype == out_dtype and y.shape == (M, N)
    x_hat, w_hat = fake_quant_act(x, 8), fake_quant_weight(w, w_bits, group_size, symmetric)
    ref = x_hat @ w_hat.T
    tol = gemm_tolerance(ref, x_hat, w_hat, out_dtype)
    assert_close_where(y, ref, tol, what="vs fake-quant")
    assert_close_where(y, w8a8_ref(a_q, a_scale, pw.qweight, pw.scale, w_zero, out_dtype), tol, what="vs w8a8_ref")
    exact = x @ w.T                                                   # loose sanity bound vs the float layer
    assert (y.float() - exact).norm() / exact.norm() < (0.05 if w_bits == 8 else 0.3)


@pytest.mark.gpu                                                        # autotuning needs a GPU
@pytest.mark.parametrize("M", [1, 16, 300])
def test_autotuned(M, device):
    x, w = torch.randn(M, 512, device=device), torch.randn(384, 512, device=device)
    a_q, a_scale = act_quant(x, 8)
    pw = pack_weight(w, 8, 128, True)
    y = w8a8_matmul(a_q, a_scale, pw.qweight, pw.scale, None, out_dtype=torch.float16)
    ref = fake_quant_act(x, 8) @ fake_quant_weight(w, 8, 128, True).T
    assert_close_where(y, ref, gemm_tolerance(ref, fake_quant_act(x, 8), fake_quant_weight(w, 8, 128), torch.float16))
