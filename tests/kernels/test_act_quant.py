"""Per-token activation quantization kernel: codes and scales must equal qvlm.core.quant.quantize_act bit for bit."""
import pytest
import torch

from kernels import act_quant, act_quant_ref, unpack_int4
from kernels.testing import assert_close_where
from qvlm.core.quant import fake_quant_act, quantize_act

SHAPES = [(1, 64), (3, 96), (16, 200), (37, 200), (37, 64)]          # (M, K): ragged against BLOCK_M = 16


def _x(M, K, dtype, device):
    x = (torch.randn(M, K, device=device) * torch.logspace(-2, 1, M, device=device)[:, None]).to(dtype)
    x[0, :3] = 0.0
    if M > 2:
        x[2] = 0.0                                                   # an all-zero token: scale floor, codes 0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("a_bits", [8, 4])
@pytest.mark.parametrize("M,K", SHAPES)
def test_codes_equal_qvlm_quant(M, K, a_bits, dtype, device):
    x = _x(M, K, dtype, device)
    q_ref, s_ref, _ = quantize_act(x, a_bits)
    q, s = act_quant(x, a_bits, BLOCK_K=64)                           # several K steps, ragged last step
    assert_close_where(q, q_ref, what="codes")
    assert_close_where(s, s_ref, what="scales")                       # exact: same fp32 ops in the same order
    q2, s2 = act_quant_ref(x, a_bits)
    assert_close_where(q2, q_ref, what="torch reference codes")
    assert_close_where(s2, s_ref, what="torch reference scales")
    # the codes dequantize to the fake-quant reference (fp32)
    assert_close_where(q.float() * s, fake_quant_act(x.float(), a_bits), what="dequantized")


@pytest.mark.parametrize("M,K", SHAPES)
def test_packed_int4(M, K, device):
    x = _x(M, K, torch.float16, device)
    q_ref, s_ref, _ = quantize_act(x, 4)
    p, s = act_quant(x, 4, pack=True, BLOCK_K=64)
    assert p.dtype == torch.uint8 and p.shape == (M, K // 2)
    assert_close_where(unpack_int4(p, signed=True), q_ref, what="packed codes")
    assert_close_where(s, s_ref, what="scales")
    assert_close_where(p, act_quant_ref(x, 4, pack=True)[0], what="torch reference bytes")


def test_leading_dims_and_rounding_ties(device):
    # exact ties: absmax 127 -> scale 1, so x = k + 0.5 must round half to even like torch.round
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0]], device=device).repeat(2, 3, 1)
    q, s = act_quant(x, 8)
    assert q.shape == x.shape and s.shape == (2, 3, 1)
    assert q[0, 0].tolist() == [0, 2, 2, 0, -2, -2, 126, 127]
    assert_close_where(q, quantize_act(x, 8)[0], what="ties")
