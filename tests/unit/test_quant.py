"""qvlm.core.quant primitives against closed forms: grids, error bounds, round trips, STE, groups, edge cases."""
import pytest
import torch

from qvlm.core import quant
from qvlm.errors import QVLMError

torch.set_num_threads(1)
TOL = 1e-6


@pytest.mark.parametrize("bits", [0, 1, 9, 17, "four", 4.0, True, None])
def test_check_bits_rejects(bits):
    with pytest.raises(QVLMError):
        quant.check_bits(bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
def test_check_bits_accepts(bits):
    assert quant.check_bits(bits) == bits


def test_check_group_size():
    assert quant.check_group_size(0, 96) == 0
    assert quant.check_group_size(32, 96) == 32
    for bad in (7, -1, 1.5, True):
        with pytest.raises(QVLMError):
            quant.check_group_size(bad, 96)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qrange(bits):
    assert quant.qrange(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant.qrange(bits, False) == (0, 2 ** bits - 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_on_grid_and_error_bound(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 33, generator=g) * 3 + (0 if symmetric else 1.0)
    scale, zero_point = quant.qparams_from_minmax(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits, symmetric)
    q = quant.quantize(x, scale, zero_point, bits, symmetric)
    qmin, qmax = quant.qrange(bits, symmetric)
    # codes are integers in range
    assert torch.equal(q, q.round()) and q.min() >= qmin and q.max() <= qmax
    xh = quant.fake_quant(x, scale, zero_point, bits, symmetric)
    # grid membership: x_hat / scale + zero_point is an integer code
    assert torch.allclose(xh / scale + zero_point, (xh / scale + zero_point).round(), atol=1e-4)
    # inside the representable range the error is at most half a step
    lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    inside = (x >= lo) & (x <= hi)
    assert inside.float().mean() > 0.9
    err = (xh - x).abs()
    assert (err[inside] <= (scale.expand_as(x)[inside] / 2) * (1 + 1e-5)).all()
    # round trip: dequantize(quantize(x)) == fake_quant(x), and fake_quant is idempotent
    assert torch.equal(quant.dequantize(q, scale, zero_point), xh)
    assert torch.equal(quant.quantize(xh, scale, zero_point, bits, symmetric), q)


def test_symmetric_closed_form():
    x = torch.tensor([[-2.0, 0.5, 0.9, 1.4]])
    scale, zero_point = quant.qparams_from_minmax(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 4, True)
    assert scale.item() == pytest.approx(2.0 / 7, abs=TOL) and zero_point.item() == 0
    # x / scale = -7, 1.75, 3.15, 4.9  ->  codes -7, 2, 3, 5
    xh = quant.fake_quant(x, scale, zero_point, 4, True)
    assert torch.allclose(xh, torch.tensor([[-7.0, 2.0, 3.0, 5.0]]) * 2 / 7, atol=TOL)


def test_asymmetric_closed_form():
    x = torch.tensor([[-1.0, 0.0, 2.0, 3.0]])
    scale, zero_point = quant.qparams_from_minmax(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 2, False)
    assert scale.item() == pytest.approx(4.0 / 3, abs=TOL)
    assert zero_point.item() == 1                                 # round(1 / (4/3)) = round(0.75) = 1
    xh = quant.fake_quant(x, scale, zero_point, 2, False)
    assert xh[0, 1].item() == 0.0                                 # zero is exactly representable


def test_ste_gradient_is_one_inside_range_zero_outside():
    scale, zero_point = torch.tensor(0.1), torch.tensor(0.0)
    x = torch.tensor([-0.33, 0.0, 0.27, 0.5, 1.0, -2.0], requires_grad=True)   # 4-bit sym range: [-0.8, 0.7]
    y = quant.fake_quant(x, scale, zero_point, 4, True, ste=True)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(quant.round_ste(torch.tensor([0.4, 0.6])), torch.tensor([0.0, 1.0]))


def test_fp_bits_is_identity():
    x = torch.randn(5, 7)
    assert quant.fake_quant_weight(x, 16) is x
    assert quant.fake_quant_act(x, 16) is x
    assert quant.fake_quant(x, torch.tensor(1.0), torch.tensor(0.0), 16, True) is x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 8, 32])
def test_weight_qparams_closed_form(group_size, symmetric):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    scale, zero_point = quant.weight_qparams(w, 4, group_size, symmetric)
    g = group_size or 32
    wg = w.reshape(6, 32 // g, g)
    assert scale.shape == (6, 32 // g)
    if symmetric:
        ref = wg.abs().amax(-1) / 7
        assert torch.allclose(scale, ref, atol=TOL) and torch.equal(zero_point, torch.zeros_like(scale))
    else:
        ref = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15
        assert torch.allclose(scale, ref, atol=TOL)
        assert torch.equal(zero_point, (-wg.amin(-1).clamp(max=0) / scale).round().clamp(0, 15))


def test_group_size_equal_to_in_features_is_per_channel():
    w = torch.randn(8, 24)
    assert torch.equal(quant.fake_quant_weight(w, 4, 24), quant.fake_quant_weight(w, 4, 0))
    assert torch.equal(quant.fake_quant_weight(w, 3, 24, False), quant.fake_quant_weight(w, 3, 0, False))


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group(symmetric):
    w = torch.randn(4, 16)
    w[1, 8:] = 0                                                    # one all-zero group of 8
    w[2] = 0                                                        # one all-zero row
    out = quant.fake_quant_weight(w, 4, 8, symmetric)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, 8:], torch.zeros(8)) and torch.equal(out[2], torch.zeros(16))
    scale, _ = quant.weight_qparams(w, 4, 8, symmetric)
    assert (scale > 0).all()


def test_group_size_not_dividing_raises():
    with pytest.raises(QVLMError):
        quant.fake_quant_weight(torch.randn(4, 30), 4, 8)


def test_odd_shapes():
    w = torch.randn(7, 13)
    out = quant.fake_quant_weight(w, 4, 13, False)
    assert out.shape == w.shape and torch.isfinite(out).all()
    x = torch.randn(3, 5, 13)
    assert quant.fake_quant_act(x, 8, True, "token").shape == x.shape


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_per_token_vs_per_tensor(symmetric):
    x = torch.randn(2, 5, 16) * torch.tensor([1.0, 10.0]).view(2, 1, 1)
    tok = quant.fake_quant_act(x, 8, symmetric, "token")
    scale, zero_point = quant.qparams_from_minmax(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 8, symmetric)
    assert scale.shape == (2, 5, 1)
    assert torch.equal(tok, quant.fake_quant(x, scale, zero_point, 8, symmetric))
    ten = quant.fake_quant_act(x, 8, symmetric, "tensor")
    s2, z2 = quant.qparams_from_minmax(x.min(), x.max(), 8, symmetric)
    assert torch.equal(ten, quant.fake_quant(x, s2, z2, 8, symmetric))
    # per-token ranges fit small rows better
    assert (tok[0] - x[0]).abs().max() < (ten[0] - x[0]).abs().max()
    with pytest.raises(QVLMError):
        quant.fake_quant_act(x, 8, symmetric, "channel")


def test_quantize_weight_round_trip_symmetric():
    w = torch.randn(8, 32)
    q, scale, zero_point = quant.quantize_weight(w, 4, 8, True)
    assert q.dtype == torch.int8
    assert torch.equal(quant.dequantize_weight(q, scale, zero_point), quant.fake_quant_weight(w, 4, 8, True))


def test_quantize_weight_round_trip_asymmetric_8bit():
    w = torch.randn(8, 32) + 0.5
    q, scale, zero_point = quant.quantize_weight(w, 8, 0, False)
    assert q.dtype == torch.uint8 and int(q.max()) > 127               # codes above 127 must not wrap
    assert torch.equal(quant.dequantize_weight(q, scale, zero_point), quant.fake_quant_weight(w, 8, 0, False))


def test_nf4_codebook_grid():
    w = torch.randn(4, 64)
    out = quant.fake_quant_nf4(w)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    codes = out.reshape(-1, 64) / absmax
    # every value is absmax * a codebook entry, and the absmax itself is kept exactly
    assert (codes[..., None] - quant.NF4_CODEBOOK).abs().amin(-1).max() < 1e-6
    assert torch.allclose(out.reshape(-1, 64).abs().amax(1, keepdim=True), absmax)


def test_quantize_rejects_nan():
    x = torch.tensor([1.0, float("nan")])
    with pytest.raises(AssertionError):
        quant.quantize(x, torch.tensor(0.1), torch.tensor(0.0), 4, True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_fast_path_equals_the_reference(bits, dtype):
    """Dynamic per-token symmetric activations without autograd take a shorter path; its values must be the
    reference fake_quant(x, act_qparams(x)) exactly (zero rows and exact zeros included), and NaN still raises."""
    torch.manual_seed(0)
    x = (torch.randn(64, 96) * torch.rand(1, 96) * 5).to(dtype)
    x[3, 7], x[5] = 0, 0
    with torch.no_grad():
        fast = quant.fake_quant_act(x, bits)
        scale, zero_point = quant.act_qparams(x, bits, True, "token")
        ref = quant.fake_quant(x, scale.to(dtype), zero_point.to(dtype), bits, True)
        assert torch.equal(fast, ref)
        x[1, 2] = float("nan")
        with pytest.raises(AssertionError, match="NaN"):
            quant.fake_quant_act(x, bits)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 16])
def test_mse_clip_never_worse_than_minmax(group_size, symmetric):
    """w_clip 'mse': each group's searched ratio lies in [1 - MSE_MAX_SHRINK, 1], includes 1 (min/max), and so its
    |error|^MSE_NORM per group is never above min/max's; on heavy-tailed rows it shrinks the range."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * torch.distributions.StudentT(2.0).sample((32, 64))
    ratio = quant.mse_clip_ratio(w, 3, group_size, symmetric)
    assert ratio.shape == quant.weight_qparams(w, 3, group_size, symmetric)[0].shape
    assert ((ratio > 1 - quant.MSE_MAX_SHRINK) & (ratio <= 1)).all() and (ratio < 1).any()

    def err(w_clip):
        s, z = quant.weight_qparams(w, 3, group_size, symmetric, w_clip=w_clip)
        d = quant.fake_quant_weight(w, 3, group_size, symmetric, s, z) - w
        return d.reshape(32, -1, group_size or 64).abs().pow(quant.MSE_NORM).sum(-1)

    assert (err("mse") <= err("minmax") + 1e-5).all() and err("mse").sum() < err("minmax").sum()


def test_w_clip_is_checked():
    with pytest.raises(QVLMError, match="w_clip"):
        quant.weight_qparams(torch.randn(4, 8), 4, w_clip="percentile")
