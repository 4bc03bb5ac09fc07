"""qvlm.core.hadamard and .rotate: Hadamard matrices of the sizes real models use (Kronecker of Paley and
Sylvester factors: 576 = 12 x 12 x 4, 1536 = 12 x 128) are Hadamard, the FWHT equals the matrix product, and the
residual rotation keeps the FP logits of tiny and of a random LLaVA with a DINOv2 tower, GQA and tied embeddings
while spreading an outlier channel of the readers' inputs.

Tolerance: the rotation is a float64 product rounded once to fp32 per weight, so logits agree to fp32 roundoff; we
allow 1e-4 of the logits' range (measured: ~1e-6 of it), as for the fold."""
import copy

import pytest
import torch

from random_llava import dinov2_llava

from qvlm import data, experiments, models
from qvlm.config import CalibConfig, EvalConfig, QuantConfig
from qvlm.core.checkpoint import load_quantized, save_quantized
from qvlm.core.hadamard import factors, fwht, hadamard_matrix, random_hadamard
from qvlm.core.qlinear import QuantLinear, RotatedInputLinear, restore_rotated_linears, rotated_linears
from qvlm.core.hooks import model_inputs
from qvlm.errors import QVLMError
from qvlm.transforms import apply as apply_transform
from qvlm.transforms.rotate import rotate_residual

RTOL = 1e-4


@pytest.mark.parametrize("n", [1, 2, 16, 12, 20, 24, 48, 384, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))
    assert int(torch.tensor(factors(n)).prod()) == n


def test_unknown_order_is_a_one_line_error():
    with pytest.raises(QVLMError, match="no Hadamard matrix of order 9"):
        hadamard_matrix(9)


@pytest.mark.parametrize("n", [8, 12, 576, 1536, 2048])     # 2048: the power of two cut into 128 x 16
def test_fwht_equals_the_matrix_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(n) / n ** 0.5, atol=1e-10)
    assert torch.allclose(fwht(x.float()), (x @ hadamard_matrix(n) / n ** 0.5).float(), atol=1e-4)


def test_random_hadamard_is_orthogonal_and_seeded():
    q = random_hadamard(576, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, random_hadamard(576, seed=3)) and not torch.equal(q, random_hadamard(576, seed=4))


def _dinov2_llava():
    return dinov2_llava()


def _close(a, b):
    return (a - b).abs().max() <= RTOL * (b.max() - b.min())


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_keeps_the_logits_of_a_dinov2_llava_with_tied_embeddings(kind):
    model, batch = _dinov2_llava()
    with torch.no_grad():
        ref = model(**batch).logits
    rec = rotate_residual(model, batch, seed=0, kind=kind)
    with torch.no_grad():
        got = model(**batch).logits
    assert _close(got, ref)
    assert rec["untied_lm_head"] and model.lm_head.weight is not model.get_input_embeddings().weight
    assert rec["n_readers"] == 2 * 5 and rec["n_writers"] == 2 * 2 + 1          # q,k,v,gate,up | o,down + projector
    assert rec["online_hadamard"] == 2                                          # every LLM layer's down_proj
    vis = [n for n, m in model.named_modules() if n.startswith(("model.vision_tower", "model.multi_modal_projector"))
           and isinstance(m, torch.nn.Linear)]
    assert vis and rec["online_hadamard_vision"] == len(vis)                   # every vision + projector linear
    assert all(isinstance(dict(model.named_modules())[n], RotatedInputLinear) for n in vis)
    downs = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    assert downs and all(isinstance(m, RotatedInputLinear) for m in downs)


def test_online_hadamard_is_carried_by_quantlinear_and_spreads_the_down_proj_input():
    model, batch = _dinov2_llava()
    down = model.model.language_model.layers[0].mlp.down_proj
    seen = {}
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight[5] *= 50.0    # a planted outlier channel of its input
    h = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        model(**batch)
    h.remove()
    rotate_residual(model, batch, seed=1)
    rot = model.model.language_model.layers[0].mlp.down_proj
    ql = QuantLinear.from_linear(rot, QuantConfig(w_bits=16, a_bits=16))
    assert ql.input_transform == "hadamard" and ql.spec()["input_transform"] == "hadamard"
    x = seen["x"]
    with torch.no_grad():
        assert torch.allclose(ql(x), rot(x), atol=1e-6)            # 16-bit QuantLinear == the FP rotated layer
        assert torch.allclose(ql.prepare_input(x), fwht(x), atol=0)
    ratio = lambda t: float(t.abs().amax((0, 1)).max() / t.abs().amax((0, 1)).median())   # noqa: E731
    assert ratio(x) > 10 and ratio(fwht(x)) < ratio(x) / 4, (ratio(x), ratio(fwht(x)))
    with pytest.raises(QVLMError, match="input_transform"):
        QuantLinear(8, 8, input_transform="givens")


def test_rotated_fp_linears_are_restored_by_name():
    model, batch = _dinov2_llava()
    rotate_residual(model, batch, seed=0)
    names = rotated_linears(model)
    assert len(names) == 2 + 14                     # 2 down_proj + 2 x 6 vision linears + 2 projector linears
    fresh, _ = _dinov2_llava()
    restore_rotated_linears(fresh, names)
    assert all(isinstance(fresh.get_submodule(n), RotatedInputLinear) for n in names)


def test_rotation_of_tiny_keeps_the_logits_and_spreads_an_outlier():
    model, processor = models.load("tiny")
    batch = model_inputs(model, data.collate(data.load_split("tiny", "val", limit=4), processor))
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    seen = {}
    h = q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 3] *= 200.0      # a planted outlier channel of the residual stream
        ref = model(**batch).logits
        before = seen["x"]
        rot = copy.deepcopy(model)
        rec = apply_transform(rot, processor, "rotate")
        h.remove()
        h = rot.model.language_model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
        got = rot(**batch).logits
    h.remove()
    assert rec["name"] == "rotate" and rec["seed"] == 0
    assert _close(got, ref)
    ratio = lambda x: float(x.abs().amax((0, 1)).max() / x.abs().amax((0, 1)).median())   # noqa: E731
    assert ratio(before) > 4 and ratio(seen["x"]) < ratio(before) / 2, (ratio(before), ratio(seen["x"]))


def test_quarot_rotated_checkpoint_round_trips(tmp_path):
    model, processor = models.load("tiny")
    samples = data.load_split("tiny", "val", limit=8)
    row = experiments.run_one(model, processor, "quarot", "W4A8", calib=CalibConfig(n_calib=4, batch_size=4),
                              eval=EvalConfig(batch_size=8), samples=samples, keep_model=True)
    assert row["transform"] == "rotate" and row["info"]["transform"]["seed"] == 0
    q = row.pop("model_object")
    save_quantized(q, experiments.setting_of("W4A8"), {"name": "quarot"}, tmp_path / "q", base_model="tiny")
    back, _ = load_quantized(tmp_path / "q")
    batch = model_inputs(q, data.collate(samples, processor))
    downs = [m for n, m in back.named_modules() if n.endswith("mlp.down_proj")]
    assert downs and all(m.input_transform == "hadamard" for m in downs)       # the online rotation reloads
    with torch.no_grad():
        assert torch.allclose(back(**batch).logits, q(**batch).logits, atol=1e-4)


def test_method_plus_transform_variants():
    v = experiments.variant("qvlm+rotate")
    assert (v["label"], v["method"], v["transform"]) == ("qvlm+rotate", "qvlm", "rotate")
    assert experiments.variant("gptq")["transform"] is None
    with pytest.raises(QVLMError, match="unknown transform 'spin'"):
        experiments.variant("qvlm+spin")
