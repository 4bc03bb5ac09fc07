"""int4 packing: byte layout, pack/unpack round trips (torch and Triton), and PackedWeight vs qvlm.core.quant."""
import pytest
import torch

from kernels import PackedWeight, pack_int4, pack_weight, unpack_int4, unpack_int4_ref, unpack_weight
from kernels.testing import assert_close_where
from qvlm.errors import QVLMError
from qvlm.core.quant import dequantize_weight, fake_quant_weight, quantize_weight


def test_byte_layout():
    # code 2j -> low nibble, code 2j+1 -> high nibble; negative codes as 4-bit two's complement
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    assert pack_int4(q, signed=True).tolist() == [[0xE1, 0x87]]
    q = torch.tensor([[15, 0, 3, 12]], dtype=torch.uint8)
    assert pack_int4(q, signed=False).tolist() == [[0x0F, 0xC3]]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("R,K", [(1, 64), (3, 96), (37, 200), (130, 2)])
def test_roundtrip(R, K, signed, device):
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (R, K), dtype=torch.int8 if signed else torch.uint8, device=device)
    q[0, :2] = lo                                       # the extreme codes survive
    q[-1, -2:] = hi - 1
    p = pack_int4(q, signed)
    assert p.dtype == torch.uint8 and p.shape == (R, K // 2)
    assert_close_where(unpack_int4_ref(p, signed), q.to(torch.int8), what="torch unpack")
    # Triton unpack with small blocks so the ragged row / byte edges are exercised
    assert_close_where(unpack_int4(p, signed, BLOCK_R=16, BLOCK_KH=16), q.to(torch.int8), what="triton unpack")


def test_pack_rejects_bad_input():
    with pytest.raises(AssertionError):
        pack_int4(torch.tensor([[8, 0]]), signed=True)                # out of the signed range
    with pytest.raises(AssertionError):
        pack_int4(torch.zeros(2, 3), signed=True)                     # odd K
    with pytest.raises(QVLMError):
        pack_weight(torch.randn(4, 6), w_bits=8, container_bits=4)    # 8-bit codes in a 4-bit container
    with pytest.raises(QVLMError):
        pack_weight(torch.randn(4, 7), w_bits=4)                      # odd K cannot be packed two per byte


@pytest.mark.parametrize("w_bits,group_size,symmetric", [
    (4, 0, True), (4, 32, False), (3, 32, True), (8, 0, False), (8, 32, True), (6, 0, False)])
def test_pack_weight_matches_qvlm_quant(w_bits, group_size, symmetric, device):
    w = torch.randn(48, 96, device=device)
    w[0] = 0.0                                                        # an all-zero channel (scale floor)
    pw = pack_weight(w, w_bits, group_size, symmetric)
    assert isinstance(pw, PackedWeight) and pw.container_bits == (4 if w_bits <= 4 else 8)
    q, scale, zero_point = quantize_weight(w, w_bits, group_size, symmetric)
    # dequantized packed weights == the reference dequantization == fake quant (all fp32, exact)
    assert_close_where(unpack_weight(pw), dequantize_weight(q, scale, zero_point), what="dequantized")
    assert_close_where(unpack_weight(pw), fake_quant_weight(w, w_bits, group_size, symmetric), what="fake quant")


def test_pack_weight_uses_calibrated_qparams(device):
    w = torch.randn(16, 64, device=device)
    scale = torch.full((16, 2), 0.05, device=device)                  # a "calibrated" step, clipping the tails
    zero_point = torch.full((16, 2), 7.0, device=device)
    pw = pack_weight(w, 4, 32, symmetric=False, scale=scale, zero_point=zero_point)
    expect = fake_quant_weight(w, 4, 32, False, scale=scale, zero_point=zero_point)
    assert_close_where(unpack_weight(pw), expect, what="calibrated")
