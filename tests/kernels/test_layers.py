"""PackedLinear (packed weights + Triton kernels) vs the fake-quant linear
F.linear(fake_quant_act(x, a_bits), fake_quant_weight(W, w_bits, ...), bias), per mode.

Tolerance: kernels.testing.gemm_tolerance with the layer's dtype as output (and, for W4A16, as MMA operand dtype),
plus the bias addition, which rounds once more in the output dtype (u_out * |bias|).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels.layers
from kernels import PackedLinear, mode_for
from kernels.testing import UNIT_ROUNDOFF, assert_close_where, gemm_tolerance
from qvlm.errors import QVLMError
from qvlm.core.quant import fake_quant_act, fake_quant_weight, weight_qparams

CASES = [  # (w_bits, a_bits, group_size, symmetric) -> mode
    (4, 16, 32, True), (4, 16, 0, False), (3, 16, 64, False),
    (8, 8, 0, True), (8, 8, 32, False), (4, 8, 64, True),
    (4, 4, 0, True), (4, 4, 64, False),
]


def _fake_quant_linear(lin, x, w_bits, a_bits, group_size, symmetric, scale=None, zero_point=None):
    """The simulated-quantization reference in fp32, and the tolerance of a kernel against it."""
    x_hat = fake_quant_act(x.float(), a_bits)
    w_hat = fake_quant_weight(lin.weight.detach().float(), w_bits, group_size, symmetric, scale, zero_point)
    ref = F.linear(x_hat, w_hat, lin.bias.float())
    dtype = lin.weight.dtype
    x2 = x_hat.reshape(-1, x.shape[-1])
    tol = gemm_tolerance(ref.reshape(x2.shape[0], -1), x2, w_hat, dtype, dtype if a_bits == 16 else None)
    tol = tol + 2 * UNIT_ROUNDOFF[dtype] * lin.bias.float().abs()
    return ref, tol.reshape(ref.shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("w_bits,a_bits,group_size,symmetric", CASES)
def test_forward_matches_fake_quant(w_bits, a_bits, group_size, symmetric, dtype, device):
    lin = torch.nn.Linear(128, 130).to(device=device, dtype=dtype)
    x = torch.randn(2, 19, 128, device=device, dtype=dtype)          # (B, T, C): 38 tokens, ragged vs BLOCK_M
    layer = PackedLinear.from_float(lin, w_bits, a_bits, group_size, symmetric)
    assert layer.mode == mode_for(w_bits, a_bits)
    y = layer(x)
    assert y.shape == (2, 19, 130) and y.dtype == dtype
    ref, tol = _fake_quant_linear(lin, x, w_bits, a_bits, group_size, symmetric)
    assert_close_where(y, ref, tol, what=f"{layer.mode} forward")


@pytest.mark.parametrize("w_bits,a_bits,group_size,symmetric", CASES[::2])
def test_torch_fallback_equals_kernels(w_bits, a_bits, group_size, symmetric, device, monkeypatch):
    # the path taken on CPU without TRITON_INTERPRET: the *_ref functions on the same buffers
    lin = torch.nn.Linear(64, 48).to(device)
    x = torch.randn(5, 64, device=device)
    layer = PackedLinear.from_float(lin, w_bits, a_bits, group_size, symmetric)
    y_kernel = layer(x)
    monkeypatch.setattr(kernels.layers, "can_launch", lambda *t: False)
    y_ref = layer(x)
    ref, tol = _fake_quant_linear(lin, x, w_bits, a_bits, group_size, symmetric)
    assert_close_where(y_ref, ref, tol, what="fallback vs fake-quant")
    assert_close_where(y_kernel, y_ref, 2 * tol, what="kernel vs fallback")


def test_calibrated_qparams_and_state_dict(device):
    lin = torch.nn.Linear(64, 32).to(device)
    w = lin.weight.detach()
    scale, zero_point = weight_qparams(w, 4, 32, False, clip_ratio=0.8)   # e.g. from a clipping search
    layer = PackedLinear.from_float(lin, 4, 4, 32, False, scale=scale, zero_point=zero_point)
    x = torch.randn(7, 64, device=device)
    ref, tol = _fake_quant_linear(lin, x, 4, 4, 32, False, scale, zero_point)
    assert_close_where(layer(x), ref, tol, what="calibrated qparams")
    assert_close_where(layer.dequantized_weight(), fake_quant_weight(w, 4, 32, False, scale, zero_point))
    fresh = PackedLinear(64, 32, 4, 4, 32, False, bias=True, dtype=w.dtype, device=device)
    fresh.load_state_dict(layer.state_dict())
    assert_close_where(fresh(x), layer(x), what="state_dict round trip")


def test_unsupported_bits():
    with pytest.raises(QVLMError):
        mode_for(8, 16)          # W8A16 has no packed kernel here
    with pytest.raises(QVLMError):
        mode_for(16, 8)          # float weights: nothing to pack
    assert mode_for(5, 4) == "w8a8"   # 5-bit codes need the int8 container
