"""qvlm.analysis.dependency: Eq. 4 conditional entropy from joint code histograms (identities), channel pairing,
collection on a random testbed model, the R^2 fit, and DED from actual rounding searches."""
import math

import pytest
import torch

from qvlm import data
from qvlm.analysis import dependency as D
from qvlm.analysis import entropy as E
from qvlm.core import units as U
from qvlm.config import QuantConfig
from qvlm.errors import QVLMError
from qvlm.models import tiny

torch.set_num_threads(1)
TOL = 1e-9


def test_function_of_x_has_zero_conditional_entropy():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (500, 8), generator=g)
    y = (3 * x + 1) % 16                                     # Y = f(X), elementwise
    joint = D.joint_counts(x, y, 16, 16)
    assert D.conditional_entropy(joint) == pytest.approx(0.0, abs=TOL)
    assert D.mutual_information(joint) == pytest.approx(E.entropy(joint.sum(0)), abs=TOL)


def test_independent_has_conditional_entropy_equal_to_marginal():
    # an exact product joint (counts = outer product of marginals): H(Y|X) = H(Y) exactly
    px = torch.tensor([1.0, 2.0, 3.0, 4.0])
    py = torch.tensor([5.0, 1.0, 0.0, 2.0])
    joint = torch.outer(px, py).double()
    assert D.conditional_entropy(joint) == pytest.approx(E.entropy(py), abs=TOL)
    assert D.mutual_information(joint) == pytest.approx(0.0, abs=TOL)


def test_sampled_independent_codes_approach_marginal():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (200_000, 1), generator=g)
    y = torch.randint(0, 4, (200_000, 1), generator=g)
    joint = D.joint_counts(x, y, 4, 4)
    assert D.conditional_entropy(joint) == pytest.approx(math.log(4), abs=1e-3)


def test_channel_pairing_for_unequal_widths():
    assert D.channel_map(6, 3).tolist() == [0, 0, 1, 1, 2, 2]
    assert D.channel_map(4, 4).tolist() == [0, 1, 2, 3]
    # narrow -> wide: every element of the wider input is paired once
    ca = torch.tensor([[0, 1]])                              # (1 token, 2 channels)
    cb = torch.tensor([[0, 0, 1, 1]])                        # (1 token, 4 channels) = f(paired channel)
    joint = D.joint_counts(ca, cb, 2, 2)
    assert joint.sum() == 4 and D.conditional_entropy(joint) == pytest.approx(0.0, abs=TOL)
    with pytest.raises(QVLMError):
        D.joint_counts(ca, cb, 2, 2, pairing="bogus")


@pytest.fixture(scope="module")
def model_and_samples():
    model, processor = tiny.build_random(0)
    return model, processor, data.calibration_set("tiny", 4, seed=0)


@pytest.mark.parametrize("granularity,pairing", [("layer", "residual"), ("unit", "index"), ("unit", "token")])
def test_run_dependency_profile(model_and_samples, granularity, pairing, tmp_path):
    model, processor, samples = model_and_samples
    stats = D.run_dependency(model, processor, samples, QuantConfig(a_bits=4), pairing=pairing,
                             granularity=granularity)
    d = stats.dependency()
    assert len(d) == len(stats.units) - 1
    if granularity == "layer":
        assert [u[0] for u in stats.units] == [b.key for b in E.llava.blocks(model)]    # one node per layer
    cross = [k for k in range(len(d)) if stats.parts[k] != stats.parts[k + 1]]
    assert cross and all(math.isnan(d[k]) for k in cross)   # tokens do not co-locate across parts
    ent = E.run_entropy(model, processor, samples, QuantConfig(a_bits=4))
    h_first = dict(zip([u[0] for u in ent.units], ent.unit_entropy()))
    firsts = [next(u[0] for u in ent.units if u[0].startswith(n[0] + ".")) if granularity == "layer" else n[0]
              for n in stats.units]
    for k, v in enumerate(d):
        if k not in cross:
            assert 0.0 <= v <= math.log(16) + TOL
            if pairing != "token":                           # H(Y | X) <= H(Y), same codes as qvlm.analysis.entropy
                assert v <= h_first[firsts[k + 1]] + 1e-6
    back = D.load_dependency(D.save_dependency(stats, tmp_path / "d.pt"))
    assert back.config["pairing"] == pairing and back.dependency() == pytest.approx(d, nan_ok=True)
    with pytest.raises(QVLMError):
        D.run_dependency(model, processor, samples, pairing="residual", granularity="unit")


def test_fit_line_and_r2():
    x = [1.0, 2.0, 3.0, 4.0]
    fit = D.fit_line(x, [2 * v + 1 for v in x])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = D.fit_line(x, [1.0, 3.0, 2.0, 4.0])
    assert 0.0 <= noisy["r2"] < 1.0
    assert D.r2_spread([fit, noisy])["r2_max"] == pytest.approx(1.0)
    with pytest.raises(QVLMError):
        D.fit_line([1.0, math.nan], [1.0, 2.0])


# --------------------------------------------------------------------------------------------- DED (b)
from qvlm.core.reconstruct import ReconConfig  # noqa: E402


@pytest.mark.parametrize("granularity", ["unit", "layer"])
def test_ded_from_actual_searches(model_and_samples, granularity):
    model, processor, samples = model_and_samples
    qcfg = QuantConfig(w_bits=3, a_bits=8)
    if granularity == "unit":
        units = U.find_units(model, processor, samples[0], ("llm",))
        edge = [k for k in range(len(units) - 1) if units[k].block != units[k + 1].block][0]   # down -> next q|k|v
    else:
        edge = 0                                                      # llm.0 -> llm.1
    for budget, joint_steps in (("per_parameter", 4), ("total", 8)):
        stats = D.run_ded(model, processor, samples[:1], qcfg, ReconConfig(iters=4), edges=[edge], scope=("llm",),
                          granularity=granularity, joint_budget=budget)
        assert [r["edge"] for r in stats.rows] == [edge]
        for r in stats.rows:
            assert r["e_layerwise"] <= r["e_rtn"] + 1e-9           # reconstruct never ends worse than its RTN start
            assert r["ded"] == pytest.approx(r["e_layerwise"] - r["e_joint"])
            assert r["rel_ded"] == pytest.approx(r["ded"] / r["energy"]) and r["energy"] > 0
            assert r["steps_layerwise"] == 8 and r["steps_joint"] == joint_steps
    if granularity == "layer":
        assert stats.rows[0]["unit"] == "llm.0" and stats.rows[0]["successor"] == "llm.1"
    with pytest.raises(QVLMError):
        D.run_ded(model, processor, samples[:2], qcfg, ReconConfig(iters=1), joint_budget="free")


def test_ded_rejects_cross_part_edges(model_and_samples):
    model, processor, samples = model_and_samples
    keys = [b.key for b in E.llava.blocks(model)]
    cross = next(k for k in range(len(keys) - 1) if keys[k].split(".")[0] != keys[k + 1].split(".")[0])
    with pytest.raises(QVLMError):
        D.run_ded(model, processor, samples[:1], QuantConfig(), ReconConfig(iters=1), edges=[cross])


def test_ded_vs_entropy_fit():
    stats = D.DEDStats({}, [], [dict(edge=k, rel_ded=0.5 * k + 0.1, ded=0.0) for k in range(4)])
    h = [0.0, 1.0, 2.0, 3.0, 4.0]                               # DED(k) is linear in H(unit k+1)
    fit = D.ded_vs_entropy(stats, h)
    assert fit["r2"] == pytest.approx(1.0) and fit["slope"] == pytest.approx(0.5)
