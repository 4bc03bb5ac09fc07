"""qvlm.deploy.fuse: one GEMM for the packed linears that read one tensor (q|k|v, gate|up).

The fused model must compute exactly what the unfused packed model computes: the same activation codes (one shared
quantizer), the same int32 accumulators per output column and the same per-column rescale -- bit for bit for the
integer GEMMs (w4a4, w8a8); the float GEMM of w4a16 may sum a wider tile in another order (fp32 roundoff). Groups are found by
tracing, so the test checks they are the linears that really share an input, whatever their names.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qvlm import deploy  # noqa: E402
from qvlm.config import QuantConfig  # noqa: E402
from qvlm.core.hooks import same_input_groups  # noqa: E402
from qvlm.core.qlinear import quantize_model  # noqa: E402
from qvlm.deploy.fuse import FusedSlice  # noqa: E402
from qvlm.errors import QVLMError  # noqa: E402
from qvlm.models import llava, tiny  # noqa: E402
from random_llava import dinov2_llava  # noqa: E402

torch.set_num_threads(1)
N_LAYERS = 2                               # dinov2_llava: 2 vision layers (query|key|value), 2 LLaMA layers


def _deployed(w_bits, a_bits):
    """The random DINOv2 + GQA LLaMA LLaVA, RTN-quantized (dynamic per-token activations) and packed; its batch."""
    model, batch = dinov2_llava()
    quantize_model(model, QuantConfig(w_bits=w_bits, a_bits=a_bits))
    return deploy.deploy(model), batch


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8), (4, 16)], ids=["w4a4", "w8a8", "w4a16"])
def test_fused_model_computes_exactly_the_unfused_one(w_bits, a_bits):
    model, batch = _deployed(w_bits, a_bits)
    before = _logits(model, batch)
    shared = [g for g in same_input_groups(dict(deploy.packed_linears(model)), lambda: _logits(model, batch))
              if len(g) > 1]
    report = deploy.fuse_shared_inputs(model, lambda: _logits(model, batch))
    assert report["fused"] == shared and not report["unfused"]
    # the linears reading one tensor: per LLaMA layer q|k|v and gate|up, per DINOv2 layer q|k|v (its fc1 reads alone)
    tails = {tuple(sorted(n.rsplit(".", 1)[-1] for n in g)) for g in report["fused"]}
    assert tails == {("gate_proj", "up_proj"), ("k_proj", "q_proj", "v_proj")}
    assert sum(".vision_tower." in g[0] for g in report["fused"]) == N_LAYERS
    assert len(report["fused"]) == 3 * N_LAYERS
    assert deploy.is_fused(model)
    after = _logits(model, batch)
    if a_bits < 16:
        assert torch.equal(after, before)                           # same integers, same rescale: bit for bit
    else:                                  # w4a16 accumulates floats: a wider tile may sum in another order
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    n_fused_layers = sum(isinstance(m, deploy.DeployedLinear) for m in model.modules())
    assert n_fused_layers == len(deploy.packed_linears(model))      # the fused layers are counted once


def test_a_slice_recomputes_for_a_new_input():
    model, _ = _deployed(4, 4)
    attn = llava.blocks(model)[-1].module.self_attn
    ref = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")}
    width = ref["q_proj"].in_features
    x1, x2 = torch.randn(1, 3, width), torch.randn(1, 3, width)
    want = {n: (m(x1), m(x2)) for n, m in ref.items()}
    deploy.fuse_shared_inputs(model, lambda: [m(x1) for m in ref.values()])
    assert all(isinstance(getattr(attn, n), FusedSlice) for n in ref)
    q, k = attn.q_proj, attn.k_proj
    assert torch.equal(q(x1), want["q_proj"][0]) and torch.equal(q(x2), want["q_proj"][1])   # new tensor: recompute
    assert torch.equal(k(x2), want["k_proj"][1]) and torch.equal(q(x2), want["q_proj"][1])   # served twice: recompute
    x2.mul_(2)                                                      # in place: the cached output is stale
    assert torch.equal(attn.v_proj(x2), ref["v_proj"](x2))


def test_members_that_differ_stay_unfused():
    model, batch = _deployed(8, 8)
    attn = llava.blocks(model)[-1].module.self_attn
    attn.k_proj.act, attn.k_proj.a_clip = "clip", torch.tensor([0.9])    # k quantizes its input differently
    before = _logits(model, batch)
    report = deploy.fuse_shared_inputs(model, lambda: _logits(model, batch))
    assert len(report["unfused"]) == 1 and ".self_attn." in next(iter(report["unfused"]))
    assert len(report["fused"]) == 3 * N_LAYERS - 1
    assert not isinstance(attn.k_proj, FusedSlice) and torch.equal(_logits(model, batch), before)


def test_fused_model_refuses_to_save_and_to_fuse_twice(tmp_path):
    model, batch = _deployed(4, 4)
    _, processor = tiny.build_random(0)
    deploy.fuse_shared_inputs(model, lambda: _logits(model, batch))
    with pytest.raises(QVLMError, match="fused"):
        deploy.save_packed(model, tmp_path / "out", processor=processor)
    assert not (tmp_path / "out").exists()
    with pytest.raises(QVLMError, match="already fused"):
        deploy.fuse_shared_inputs(model, lambda: _logits(model, batch))
