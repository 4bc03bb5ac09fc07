"""W4A16 kernel vs its torch reference and vs qvlm.core.quant fake quantization (x @ fake_quant_weight(W).T in fp32).

Tolerances (kernels.testing.gemm_tolerance): the kernel rounds each dequantized weight to x's dtype before the MMA
(u_op * |x| @ |W_hat|.T), accumulates in fp32 (K * 2^-24 * |x| @ |W_hat|.T) and rounds the output (2 * u_out * |ref|).
"""
import pytest
import torch

from kernels import pack_weight, w4a16_matmul, w4a16_ref
from kernels.testing import assert_close_where, gemm_tolerance
from qvlm.core.quant import fake_quant_weight

SHAPES = [(M, K, N) for M in (1, 3, 16, 37) for K in (64, 96, 200) for N in (48, 130)]
BLOCK = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}                 # ragged against every shape above


def _check(M, K, N, dtype, group_size, symmetric, device, block):
    x = torch.randn(M, K, device=device).to(dtype)
    w = torch.randn(N, K, device=device)
    pw = pack_weight(w, 4, group_size, symmetric)
    y = w4a16_matmul(x, pw.qweight, pw.scale, pw.zero_point, symmetric, block=block)
    assert y.dtype == dtype and y.shape == (M, N)
    w_hat = fake_quant_weight(w, 4, group_size, symmetric)            # (N, K) fp32, the Q-VLM reference weight
    ref = x.float() @ w_hat.T
    tol = gemm_tolerance(ref, x.float(), w_hat, out_dtype=dtype, operand_dtype=dtype)
    assert_close_where(y, ref, tol, what="vs fake-quant")
    assert_close_where(y, w4a16_ref(x, pw.qweight, pw.scale, pw.zero_point, symmetric), tol, what="vs w4a16_ref")
    # loose sanity bound against the unquantized layer: 4-bit RTN noise is ~15 % of the output norm here
    exact = x.float() @ w.T
    assert (y.float() - exact).norm() / exact.norm() < 0.3


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_shapes(M, K, N, device):
    _check(M, K, N, torch.float32, 32 if K % 32 == 0 else 0, True, device, BLOCK)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("M,K,N,group_size,BLOCK_K", [
    (37, 200, 130, 0, 64),       # per channel, ragged K steps
    (37, 96, 130, 32, 32),       # groups aligned with K steps: one scale vector per step
    (3, 96, 48, 32, 64),         # two groups per K step: per-byte scale gather
    (16, 200, 48, 40, 64),       # group size not a power of two: gather
])
def test_variants(M, K, N, group_size, BLOCK_K, symmetric, dtype, device):
    _check(M, K, N, dtype, group_size, symmetric, device, {**BLOCK, "BLOCK_K": BLOCK_K})


@pytest.mark.gpu                                                        # autotuning needs a GPU
@pytest.mark.parametrize("M", [1, 16, 300])
def test_autotuned(M, device):
    _check(M, 512, 384, torch.float16, 128, False, device, None)
