"""Per-token activation quantization kernel: codes and scales must equal qvlm.core.quant bit for bit: quantize_act
(dynamic), qparams_from_minmax(lo * clip, hi * clip) + quantize (learned clip ratio), quantize with a static step."""
import pytest
import torch

from kernels import act_quant, act_quant_ref, unpack_int4
from kernels.testing import assert_close_where
from qvlm.core.quant import fake_quant_act, qparams_from_minmax, quantize, quantize_act
from qvlm.errors import QVLMError

SHAPES = [(1, 64), (3, 96), (16, 200), (37, 200), (37, 64), (130, 96)]   # (M, K): ragged against BLOCK_M = 64


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


# ------------------------------------------------------------------ learned clip ratio and static per-tensor steps
# What the methods produce (qvlm.core.qlinear.ActQuantizer): a clip ratio c in CLIP_RANGE that shrinks each token's
# range, or a calibrated per-tensor step (zero point 0). The fake-quant reference is qparams_from_minmax + quantize.
MODES = [(8, False), (4, False), (4, True)]                           # (a_bits, pack)
CASES = [(3, 96, torch.float32), (37, 200, torch.float32), (37, 64, torch.float16)]   # ragged M and K


def _unpacked(q, pack, K):
    return unpack_int4(q.reshape(-1, K // 2), signed=True).reshape(*q.shape[:-1], K) if pack else q


def test_clip_commutes_with_absmax():
    # max(|lo*c|, |hi*c|) / qmax (the reference) == absmax * c / qmax (the kernel) bit for bit, since c > 0
    x = torch.randn(4096, 64) * torch.logspace(-6, 4, 4096)[:, None]                # (rows, K), wide range
    x[::7] = x[::7].half().float()                                                   # some fp16-representable rows
    clips = torch.cat([torch.tensor([0.05, 0.7, 1.0, 0.1 + 2 ** -20]), torch.rand(60) * 0.95 + 0.05])
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    for c in clips:
        for bits in (2, 4, 8):
            ref, _ = qparams_from_minmax(lo * c, hi * c, bits, True)
            ours = (x.abs().amax(dim=-1, keepdim=True) * c / (2 ** (bits - 1) - 1)).clamp_min(1e-8)
            assert torch.equal(ours, ref), f"clip={float(c)!r} bits={bits}"


@pytest.mark.parametrize("clip", [1.0, 0.7, 0.05])
@pytest.mark.parametrize("a_bits,pack", MODES)
@pytest.mark.parametrize("M,K,dtype", CASES)
def test_clip_equals_reference(M, K, dtype, a_bits, pack, clip, device):
    x = _x(M, K, dtype, device)
    q, s = act_quant(x, a_bits, pack, BLOCK_K=64, clip=clip)
    q_ref, s_ref = act_quant_ref(x, a_bits, pack, clip=clip)
    assert q.shape == q_ref.shape and s.shape == (M, 1)
    assert_close_where(q, q_ref, what="codes vs act_quant_ref")
    assert_close_where(s, s_ref, what="scales vs act_quant_ref")
    # the fake-quant reference: ActQuantizer / DeployedLinear.act_codes' clip path, in fp32
    xf = x.float()
    c = torch.tensor(clip, device=device)                              # a 0-d fp32 tensor, like a clamped a_clip
    scale, zp = qparams_from_minmax(xf.amin(-1, keepdim=True) * c, xf.amax(-1, keepdim=True) * c, a_bits, True)
    assert_close_where(s, scale, what="scales vs qparams_from_minmax")
    assert_close_where(_unpacked(q, pack, K), quantize(xf, scale, zp, a_bits, True), what="codes vs quantize")
    # the same codes with the ratio given as a tensor (no host read on GPU)
    q_t, s_t = act_quant(x, a_bits, pack, BLOCK_K=64, clip=c.reshape(1))
    assert torch.equal(q_t, q) and torch.equal(s_t, s)
    if clip == 1.0:                                                     # c = 1 is the default path, exactly
        q0, s0 = act_quant(x, a_bits, pack, BLOCK_K=64)
        assert torch.equal(q0, q) and torch.equal(s0, s)


def _static_steps(x, a_bits):
    """A calibrated step (the tensor's absmax / qmax) and one 10x smaller that saturates many codes."""
    s = (x.float().abs().max() / (2 ** (a_bits - 1) - 1)).clamp_min(1e-8).reshape(1)
    return {"calibrated": s, "saturating": s / 10}


@pytest.mark.parametrize("step", ["calibrated", "saturating"])
@pytest.mark.parametrize("a_bits,pack", MODES)
@pytest.mark.parametrize("M,K,dtype", CASES)
def test_static_equals_reference(M, K, dtype, a_bits, pack, step, device):
    x = _x(M, K, dtype, device)
    s_static = _static_steps(x, a_bits)[step]
    q, s = act_quant(x, a_bits, pack, BLOCK_K=64, static_scale=s_static)
    q_ref, s_ref = act_quant_ref(x, a_bits, pack, static_scale=s_static)
    assert_close_where(q, q_ref, what="codes vs act_quant_ref")
    assert_close_where(s, s_ref, what="scales vs act_quant_ref")
    assert s.shape == (M, 1) and torch.equal(s, s_static.expand(M, 1))
    # the fake-quant reference: DeployedLinear.act_codes' static path (zero point 0), in fp32
    codes = _unpacked(q, pack, K)
    assert_close_where(codes, quantize(x.float(), s_static, 0.0, a_bits, True), what="codes vs quantize")
    qmax = 2 ** (a_bits - 1) - 1
    n_sat = int(((codes == qmax) | (codes == -qmax - 1)).sum())
    if step == "saturating":
        assert n_sat > codes.numel() // 10, f"only {n_sat} of {codes.numel()} codes saturated"


def test_static_huge_quotients_saturate(device):
    # |x / s| far beyond int32: the kernel clamps in fp32 before rounding, so these saturate instead of wrapping
    x = torch.tensor([[1e30, -1e30, 3e9, -3e9, 0.0, 1.0, float("inf"), float("-inf")]], device=device)
    s = torch.tensor([1e-3], device=device)
    q, _ = act_quant(x, 8, static_scale=s)
    assert q[0].tolist() == [127, -128, 127, -128, 0, 127, 127, -128]
    assert torch.equal(q, act_quant_ref(x, 8, static_scale=s)[0])


def test_static_leading_dims(device):
    x = torch.randn(2, 3, 16, device=device)
    s_static = torch.tensor(0.02, device=device)                        # 0-d works too
    q, s = act_quant(x, 4, pack=True, static_scale=s_static)
    assert q.shape == (2, 3, 8) and s.shape == (2, 3, 1) and bool((s == 0.02).all())
    assert torch.equal(q, act_quant_ref(x, 4, pack=True, static_scale=s_static)[0])


@pytest.mark.parametrize("fn", [act_quant, act_quant_ref])
def test_clip_and_static_errors(fn, device):
    x = torch.randn(4, 16, device=device)
    s = torch.tensor([0.1], device=device)
    with pytest.raises(QVLMError, match="both given"):
        fn(x, 8, clip=0.5, static_scale=s)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(QVLMError, match="static_scale=.* must be > 0"):
            fn(x, 8, static_scale=torch.tensor([bad]))                  # a CPU tensor: checked on the host
        with pytest.raises(QVLMError, match="clip=.* must be > 0"):
            fn(x, 8, clip=bad)
    with pytest.raises(QVLMError, match="expected one element"):
        fn(x, 8, static_scale=torch.tensor([0.1, 0.2]))
    with pytest.raises(QVLMError, match="expected one element"):
        fn(x, 8, clip=torch.ones(2))
    with pytest.raises(QVLMError, match="1-element tensor"):
        fn(x, 8, static_scale=0.1)
    with pytest.raises(QVLMError) as e:
        fn(x, 8, clip=0.5, static_scale=s)
    assert "\n" not in str(e.value)                                    # one line: problem -- fix
