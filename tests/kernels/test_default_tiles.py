"""Default tiles (no `block`): in the interpreter `_common.interpreter_block` (one big tile per problem, K steps that
divide the group), on CUDA the autotuned configs. The integer GEMMs' results must not depend on the tiles at all
(exact int32 sums, the same per-group rescale), so the default launch is compared bit for bit with a small-tile one;
W4A16 (fp32 accumulation in K steps) within the test_w4a16 tolerance of its reference.
"""
import pytest
import torch

from kernels import INTERPRET, act_quant, pack_int4, pack_weight, w4a4_matmul, w4a16_matmul, w4a16_ref, w8a8_matmul
from kernels._common import interpreter_block
from kernels.testing import assert_close_where, gemm_tolerance
from qvlm.core.quant import fake_quant_weight

# per-channel with a ragged K; a group of 96 (not a power of two: steps of 32); several groups of 64;
# M past one interpreter tile (1024 rows) and N past one (512 columns)
CASES = [(37, 200, 130, 0), (70, 256, 96, 64), (1100, 64, 520, 0)]
if INTERPRET:   # on CUDA the integer GEMMs need group_size % 64 == 0 (int8 MMA K >= 32 per packed half)
    CASES.append((5, 192, 48, 96))


def test_interpreter_block_sizes():
    assert interpreter_block(688, 384, 128, 128) == {"BLOCK_M": 1024, "BLOCK_N": 512, "BLOCK_K": 128, "GROUP_M": 8}
    assert interpreter_block(1, 96, 96, 96)["BLOCK_K"] == 128           # per-channel: next power of two, masked
    assert interpreter_block(1, 96, 192, 96)["BLOCK_K"] == 32           # grouped: the largest power of two dividing 96
    assert interpreter_block(5000, 5000, 4096, 4096) == {"BLOCK_M": 1024, "BLOCK_N": 512, "BLOCK_K": 512, "GROUP_M": 8}


@pytest.mark.parametrize("M,K,N,group_size", CASES)
def test_integer_gemms_do_not_depend_on_tiles(M, K, N, group_size, device):
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device)
    small = {"BLOCK_M": 16 if M <= 128 else 512, "BLOCK_N": 32 if N <= 256 else 256, "BLOCK_K": 32}   # several tiles
    a_q, a_scale = act_quant(x, 8)
    assert torch.equal(a_q, act_quant(x, 8, BLOCK_M=16)[0])
    pw = pack_weight(w, 8, group_size, True, container_bits=8)
    y = w8a8_matmul(a_q, a_scale, pw.qweight, pw.scale, out_dtype=torch.float32)
    assert torch.equal(y, w8a8_matmul(a_q, a_scale, pw.qweight, pw.scale, out_dtype=torch.float32, block=small))
    a_p, a4_scale = act_quant(x, 4, pack=True)
    pw4 = pack_weight(w, 4, group_size, False)
    y4 = w4a4_matmul(a_p, a4_scale, pw4.qweight, pw4.scale, pw4.zero_point, False, out_dtype=torch.float32)
    small4 = {**small, "BLOCK_K": 64 if group_size % 64 == 0 else 32}       # 32 only in the interpreter
    assert torch.equal(y4, w4a4_matmul(a_p, a4_scale, pw4.qweight, pw4.scale, pw4.zero_point, False,
                                       out_dtype=torch.float32, block=small4))
    assert torch.equal(pack_int4(act_quant(x, 4)[0].to(torch.int8), signed=True), a_p)


@pytest.mark.parametrize("M,K,N,group_size", CASES)
def test_w4a16_default_tiles(M, K, N, group_size, device):
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device)
    pw = pack_weight(w, 4, group_size, True)
    y = w4a16_matmul(x, pw.qweight, pw.scale, None, True)
    ref = w4a16_ref(x, pw.qweight, pw.scale, None, True)
    w_hat = fake_quant_weight(w, 4, group_size, True)
    assert_close_where(y, ref, gemm_tolerance(x @ w_hat.T, x, w_hat, out_dtype=torch.float32), what="vs w4a16_ref")
