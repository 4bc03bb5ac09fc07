"""W4A4 kernel: exact int32 accumulator vs the integer matmul of qvlm.core.quant codes (both operands packed int4,
unpacked in registers to int8 MMA), and the rescaled output vs its torch reference and vs
fake_quant_act(x, 4) @ fake_quant_weight(W, 4).T (fp32). Tolerances as in test_w8a8.py.
"""
import pytest
import torch

from kernels import INTERPRET, act_quant, pack_int4, pack_weight, w4a4_int32, w4a4_int32_ref, w4a4_matmul, w4a4_ref
from kernels.testing import assert_close_where, gemm_tolerance
from qvlm.core.quant import fake_quant_act, fake_quant_weight, quantize_act, quantize_weight

SHAPES = [(M, K, N) for M in (1, 3, 16, 37) for K in (64, 96, 200) for N in (48, 130)]
BLOCK = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}                 # BLOCK_K 64: two int8 dots of K = 32


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_int32_accumulator_exact(M, K, N, symmetric, device):
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device)
    q_a, _, _ = quantize_act(x, 4)                                    # (M, K) int8 codes in [-8, 7]
    q_w, _, _ = quantize_weight(w, 4, 0, symmetric)                   # (N, K) codes in [-8, 7] or [0, 15]
    a_p, w_p = pack_int4(q_a, signed=True), pack_int4(q_w, signed=symmetric)
    acc = w4a4_int32(a_p, w_p, symmetric, block=BLOCK)
    assert acc.dtype == torch.int32
    assert_close_where(acc, q_a.double() @ q_w.double().T, what="int32 vs codes matmul")
    assert_close_where(acc, w4a4_int32_ref(a_p, w_p, symmetric), what="int32 vs reference")


CASES = [(37, 200, 130, 0, 64), (3, 128, 48, 64, 64), (16, 96, 130, 0, 64)]
if INTERPRET:   # BLOCK_K 32 gives int8 dots of K = 16: fine in the interpreter, below the GPU's int8 MMA minimum
    CASES.append((37, 96, 48, 32, 32))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M,K,N,group_size,BLOCK_K", CASES)
def test_rescaled(M, K, N, group_size, BLOCK_K, symmetric, out_dtype, device):
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device)
    a_p, a_scale = act_quant(x, 4, pack=True)
    pw = pack_weight(w, 4, group_size, symmetric)
    y = w4a4_matmul(a_p, a_scale, pw.qweight, pw.scale, pw.zero_point, symmetric, out_dtype,
                    block={**BLOCK, "BLOCK_K": BLOCK_K})
    assert y.dtype == out_dtype and y.shape == (M, N)
    x_hat, w_hat = fake_quant_act(x, 4), fake_quant_weight(w, 4, group_size, symmetric)
    ref = x_hat @ w_hat.T
    tol = gemm_tolerance(ref, x_hat, w_hat, out_dtype)
    assert_close_where(y, ref, tol, what="vs fake-quant")
    y_ref = w4a4_ref(a_p, a_scale, pw.qweight, pw.scale, pw.zero_point, symmetric, out_dtype)
    assert_close_where(y, y_ref, tol, what="vs w4a4_ref")
    exact = x @ w.T                                                   # loose sanity bound vs the float layer
    assert (y.float() - exact).norm() / exact.norm() < 0.5           # W4A4 RTN on gaussians: ~20-25 % here


@pytest.mark.gpu                                                        # autotuning needs a GPU
@pytest.mark.parametrize("M", [1, 16, 300])
def test_autotuned(M, device):
    x, w = torch.randn(M, 512, device=device), torch.randn(384, 512, device=device)
    a_p, a_scale = act_quant(x, 4, pack=True)
    pw = pack_weight(w, 4, 128, True)
    y = w4a4_matmul(a_p, a_scale, pw.qweight, pw.scale, None, True, torch.float16)
    x_hat, w_hat = fake_quant_act(x, 4), fake_quant_weight(w, 4, 128, True)
    ref = x_hat @ w_hat.T
    assert_close_where(y, ref, gemm_tolerance(ref, x_hat, w_hat, torch.float16))
