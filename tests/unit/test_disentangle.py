"""qvlm.method.disentangle: the differentiable entropy surrogate against the hard histogram, the trainable-parameter
choice, the Jacobian gammas, and one VEO optimisation step lowering its own loss (Eq. 5)."""
import math

import pytest
import torch

from qvlm import data
from qvlm.analysis import entropy as E
from qvlm.core import hooks as H
from qvlm.method import disentangle as V
from qvlm.config import QuantConfig
from qvlm.errors import QVLMError
from qvlm.models import llava, tiny

torch.set_num_threads(1)


def test_triangle_kernel_equals_hard_histogram_on_levels():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (64, 16), generator=g).float()          # symmetric 4-bit codes
    scale = torch.full((64, 1), 0.25)
    p = V.soft_level_probs(q * scale, scale, torch.zeros_like(scale), 4, True, "triangle")
    hard = E.level_counts((q + 8).long(), 4)
    assert torch.allclose(p.double(), hard / hard.sum(), atol=1e-6)
    assert V.soft_entropy(p).item() == pytest.approx(E.entropy(hard), abs=1e-5)


def test_gaussian_kernel_approaches_hard_histogram():
    x = torch.randn(20_000, 8, generator=torch.Generator().manual_seed(1))
    qcfg = QuantConfig(a_bits=4)
    hard = E.entropy(E.level_counts(E.codes(x, 4), 4))
    soft = V.surrogate_entropy(x, qcfg, 4, kernel="gaussian", tau=0.01).item()
    assert soft == pytest.approx(hard, abs=0.02)
    assert 0 < V.surrogate_entropy(x, qcfg, 4).item() <= math.log(16)


def test_surrogate_is_differentiable():
    x = torch.randn(32, 16, requires_grad=True)
    V.surrogate_entropy(x, QuantConfig(a_bits=4), 4).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


@pytest.fixture(scope="module")
def calib():
    return data.calibration_set("tiny", 4, seed=0)


def test_encoder_parameter_choices():
    model, _ = tiny.build_random(0)
    ln = V.encoder_parameters(model, "layernorm")
    assert ln and all("norm" in n for n in ln)                       # LayerNorm affine only
    assert all(n.startswith("model.vision_tower.") for n in ln)
    last = V.encoder_parameters(model, "layernorm+last", n_last=1)
    n_used = V.used_vision_layers(model)
    assert any(f"layers.{n_used - 1}.mlp.fc1" in n for n in last) and not any("layers.0.mlp" in n for n in last)
    assert len(V.encoder_parameters(model, "all")) == len(list(llava.parts(model)["vision"].module.parameters()))
    with pytest.raises(QVLMError):
        V.encoder_parameters(model, "lora")


def test_veo_lowers_its_loss_leaves_the_fp_model_alone_and_applies(calib, tmp_path):
    model, processor = tiny.build_random(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = V.VEOConfig(iters=1, lr=1e-3, eta=1.0, batch_size=len(calib))     # one batch: the step sees it all
    res = V.run_disentangle(model, processor, calib, cfg, QuantConfig(a_bits=4))
    # the FP model is untouched: VEO trained a copy and returned its encoder parameters
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sum(res.gamma.values()) == pytest.approx(1.0) and min(res.gamma.values()) > 0
    eta = res.grad_norms["eta_effective"]                             # relative eta: equal gradient pull
    assert eta == pytest.approx(res.grad_norms["l_ar"] / res.grad_norms["entropy"])
    obj = lambda d: d["l_ar"] + eta * d["entropy"]                    # noqa: E731
    assert obj(res.after) < obj(res.before)                          # one optimisation step lowers L_VEO
    assert res.before["kl"] == pytest.approx(0.0, abs=1e-6)           # before any step the copy IS the FP model
    assert {"H_image_before", "H_all_before", "H_image_after", "H_all_after"} <= set(res.hard_entropy)
    # apply: a fresh copy of the original model reproduces the optimised encoder
    fresh, _ = tiny.build_random(0)
    back = V.load_disentangle(V.save_disentangle(res, tmp_path / "veo.pt"))
    V.apply_disentangle(fresh, back)
    changed = {n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(res.params) and all(n.startswith("model.vision_tower.") for n in changed)
    assert back.config["encoder_params"] == "layernorm"
    # the guard runs on val and records its verdict
    g = V.check_guard(model, processor, res, data.load_split("tiny", "val", limit=8), batch_size=8)
    assert set(g) >= {"fp_val_before", "fp_val_after", "reverted"} and res.guard == g
    with pytest.raises(QVLMError):
        V.check_guard(model, processor, res, data.load_split("tiny", "test", limit=4))


def test_kl_anchor_optimises_kl_to_the_fp_model(calib):
    """anchor "kl": the loss VEO steps on is KL(p_FP || p) + eta H (not L_AR), eta still scaled by L_AR's gradient."""
    model, processor = tiny.build_random(0)
    cfg = V.VEOConfig(iters=2, lr=1e-3, eta=1.0, anchor="kl", batch_size=len(calib))
    res = V.run_disentangle(model, processor, calib, cfg, QuantConfig(a_bits=4))
    eta = res.grad_norms["eta_effective"]
    assert eta == pytest.approx(res.grad_norms["l_ar"] / res.grad_norms["entropy"])
    for h in res.history:
        assert h["loss"] == pytest.approx(h["kl"] + eta * h["entropy"], rel=1e-5)
    assert res.history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and res.config["anchor"] == "kl"
    with pytest.raises(QVLMError, match="anchor"):
        V.VEOConfig(anchor="ce")


def test_train_split_only(calib):
    model, processor = tiny.build_random(0)
    test_samples = data.load_split("tiny", "test", limit=2)
    with pytest.raises(QVLMError):
        V.run_disentangle(model, processor, test_samples, V.VEOConfig(iters=1))


def test_more_peaked_tokens_have_lower_code_entropy():
    """The mechanism bench.veo reports: scaling one channel of every token up raises log_crest and LOWERS the
    per-token quantizer's code entropy (coarser steps for the bulk) -- a lower entropy is not a better input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    peaked = x.clone()
    peaked[:, 0] *= 8
    assert V.log_crest(peaked) > V.log_crest(x) + 0.3
    h = lambda t: E.entropy(E.level_counts(E.codes(t, 4), 4))            # noqa: E731
    assert h(peaked) < h(x) - 0.3
