"""Online Walsh-Hadamard kernel (QuaRot's down_proj rotation): equals the torch references up to fp32 summation
order, for power-of-two sizes and Kronecker sizes m * 2^k (SmolLM2's MLP 1536 = 12 x 128), ragged token counts and
fp32 / fp16 / bf16; the fused transform + per-token codes are bit-identical to the unfused pair."""
import math

import pytest
import torch

from kernels import act_quant_ref, hadamard, hadamard_act_quant, hadamard_ref, hadamard_supported, unpack_int4
from kernels.testing import UNIT_ROUNDOFF, assert_close_where
from qvlm.core.hadamard import fwht, hadamard_matrix, kernel_base
from qvlm.errors import QVLMError

SIZES = [64, 128, 384, 1536, 4096, 5120]     # 2^k; 12 x 32; 12 x 128; 16 chunks of 256; 20 x 256


def _tol(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|kernel - ref| bound: fp32 accumulation over n terms of magnitude sum|x| / sqrt(n) (same for every output of a
    row), plus the final rounding of both to x's dtype (one unit in the last place each)."""
    n = x.shape[-1]
    mag = x.double().abs().sum(-1, keepdim=True) / math.sqrt(n)
    return n * UNIT_ROUNDOFF[torch.float32] * mag + 2 * UNIT_ROUNDOFF[x.dtype] * ref.double().abs()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("M", [1, 37])
def test_equals_fwht_and_dense_reference(n, M, device):
    x = torch.randn(M, n, device=device)
    x[0, 5] = 40.0                                                   # an outlier channel, as in down_proj inputs
    base = kernel_base(n, device)
    y = hadamard(x, base)
    ref = hadamard_ref(x, base)
    assert_close_where(y, ref, _tol(x, ref), what="kernel vs hadamard_ref")
    assert_close_where(fwht(x), ref, _tol(x, ref), what="fwht vs hadamard_ref")      # the torch path of deployment
    if n <= 1536:                                                    # the dense matrix: the definition itself
        dense = (x.double() @ hadamard_matrix(n).double().to(device) / math.sqrt(n))
        assert_close_where(y, dense, _tol(x, ref), what="kernel vs x @ H / sqrt(n)")
    # orthogonal: norms kept, and the outlier spread over all channels
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    assert y[0].abs().max() < 0.5 * 40.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [128, 1536])
def test_half_precision_and_leading_dims(n, dtype, device):
    x = torch.randn(2, 5, n, device=device).to(dtype)               # 10 tokens: ragged against the row tile
    base = kernel_base(n, device)
    y = hadamard(x, base)
    ref = hadamard_ref(x, base)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_where(y, ref, _tol(x, ref), what=f"{dtype} kernel vs reference")


@pytest.mark.parametrize("BLOCK_M", [None, 1, 4, 64])
def test_row_tiles_do_not_change_the_result(BLOCK_M, device):
    x = torch.randn(37, 384, device=device)
    base = kernel_base(384, device)
    assert_close_where(hadamard(x, base, BLOCK_M=BLOCK_M), hadamard(x, base, BLOCK_M=16), 1e-6, what="tiles")


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("a_bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_quantization_is_the_unfused_pair(a_bits, pack, dtype, device):
    if pack and a_bits == 8:
        pytest.skip("packing is for 4-bit codes")
    x = torch.randn(19, 1536, device=device).to(dtype)
    x[3] = 0.0                                                       # all-zero token: scale floor, codes 0
    base = kernel_base(1536, device)
    q, s = hadamard_act_quant(x, base, a_bits, pack=pack)
    q_ref, s_ref = act_quant_ref(hadamard(x, base), a_bits, pack=pack)
    assert_close_where(s, s_ref, what="scales")
    assert_close_where(q, q_ref, what="codes")                       # bit-identical: same transform, same rounding
    codes = unpack_int4(q, signed=True) if pack else q
    assert codes[3].abs().max() == 0
    q2, _ = act_quant_ref(hadamard_ref(x, base), a_bits)             # vs the torch transform: at most one code off
    assert (codes.int() - q2.int()).abs().max() <= 1


def test_empty_input(device):
    x = torch.randn(0, 128, device=device)
    assert hadamard(x).shape == (0, 128)
    q, s = hadamard_act_quant(x, None, 4, pack=True)
    assert q.shape == (0, 64) and s.shape == (0, 1)


@pytest.mark.parametrize("n,base,match", [
    (1536, None, "not a power of two"),                            # 1536 needs its order-12 base
    (1536, "eye5", "not a multiple"),
    (128, "rect", "square"),
    (576, "kb", "chunk-mixing"),                                   # 576 = 144 x 4: the mixing matrix is too big
])
def test_bad_sizes_raise_one_line_errors(n, base, match, device):
    b = {None: None, "eye5": torch.eye(5), "rect": torch.ones(2, 3), "kb": kernel_base(n)}[base]
    with pytest.raises(QVLMError, match=match):
        hadamard(torch.randn(3, n, device=device), b)
    if base != "rect":
        assert not hadamard_supported(n, b)                           # callers fall back to the torch FWHT


@pytest.mark.parametrize("n", SIZES)
def test_supported_sizes(n):
    assert hadamard_supported(n, kernel_base(n))


def test_bad_dtype_and_tile_raise(device):
    with pytest.raises(QVLMError, match="dtype"):
        hadamard(torch.ones(3, 64, dtype=torch.int32, device=device))
    with pytest.raises(QVLMError, match="power of two"):
        hadamard(torch.randn(3, 64, device=device), BLOCK_M=3)
