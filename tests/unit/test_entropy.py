"""qvlm.analysis.entropy: the level-histogram entropy estimator against closed forms, and the hook collection on a
random-init testbed model (per-token scales, image/text split, units)."""
import math

import pytest
import torch

from qvlm import data
from qvlm.analysis import entropy as E
from qvlm.core import units as U
from qvlm.config import QuantConfig
from qvlm.errors import QVLMError
from qvlm.models import tiny

torch.set_num_threads(1)
TOL = 1e-9


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_levels_give_log_k(bits):
    k = 2 ** bits
    c = torch.arange(k).repeat(7)                           # every level equally often
    assert E.entropy(E.level_counts(c, bits)) == pytest.approx(math.log(k), abs=TOL)


def test_one_hot_gives_zero():
    counts = torch.zeros(16, dtype=torch.float64)
    counts[3] = 100
    assert E.entropy(counts) == 0.0
    assert E.entropy(counts, "miller_madow") == 0.0         # (m - 1) / 2N = 0 for one occupied bin


def test_empty_histogram_is_nan_and_bad_estimator_raises():
    assert math.isnan(E.entropy(torch.zeros(4)))
    with pytest.raises(QVLMError):
        E.entropy(torch.ones(4), "bogus")


def test_miller_madow_correction():
    counts = torch.tensor([3.0, 1.0, 0.0, 4.0])
    assert E.entropy(counts, "miller_madow") == pytest.approx(E.entropy(counts) + (3 - 1) / (2 * 8), abs=TOL)


@pytest.mark.parametrize("bits,scale", [(4, 0.35), (3, 0.8), (8, 0.02)])
def test_quantized_gaussian_matches_numerical_value(bits, scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=g)
    c = E.codes(x[:, None], bits, symmetric=True, granularity="tensor",
                scale=torch.tensor(scale), zero_point=torch.tensor(0.0))
    h = E.entropy(E.level_counts(c, bits))
    ref = E.gaussian_code_entropy(scale, bits, symmetric=True)
    assert 0 < ref < math.log(2 ** bits)
    assert h == pytest.approx(ref, abs=0.01)                 # sampling error of 400k draws is ~1e-3


def test_per_token_scales_are_applied_per_token():
    # every token has the same shape but a different magnitude: with per-token steps all tokens give the same
    # codes, so the pooled histogram equals one token's histogram; per-tensor codes would differ by token.
    base = torch.linspace(-1, 1, 32)
    x = torch.stack([base * m for m in (0.01, 1.0, 300.0)])   # (3 tokens, 32 channels)
    c = E.codes(x, 4, symmetric=True, granularity="token")
    assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])
    pooled = E.entropy(E.level_counts(c, 4))
    assert pooled == pytest.approx(E.entropy(E.level_counts(c[1], 4)), abs=TOL)
    ct = E.codes(x, 4, symmetric=True, granularity="tensor")
    assert not torch.equal(ct[0], ct[2])


def test_codes_range_and_fp_bits_rejected():
    x = torch.randn(5, 9)
    for sym in (True, False):
        c = E.codes(x, 3, symmetric=sym)
        assert c.min() >= 0 and c.max() <= 7
    with pytest.raises(QVLMError):
        E.codes(x, 16)


@pytest.fixture(scope="module")
def model_and_samples():
    model, processor = tiny.build_random(0)
    return model, processor, data.calibration_set("tiny", 6, seed=0)


def test_units_group_linears_that_share_an_input(model_and_samples):
    model, processor, samples = model_and_samples
    units = U.find_units(model, processor, samples[0])
    names = [u.name for u in units]
    assert "llm.0.q_proj+k_proj+v_proj" in names and "llm.0.gate_proj+up_proj" in names
    assert "vision.0.q_proj+k_proj+v_proj" in names and "projector.0.linear_1" in names
    assert sum(len(u.keys) for u in units) == len(E.llava.linear_layers(model))


def test_run_entropy_profile(model_and_samples, tmp_path):
    model, processor, samples = model_and_samples
    stats = E.run_entropy(model, processor, samples, QuantConfig(a_bits=4))
    rows = stats.table()
    assert len(rows) == len(E.llava.linear_layers(model))
    for r in rows:
        assert 0 <= r["H_all"] <= r["log_K"] + TOL                 # finite, non-negative, bounded by log K
        if r["part"] == "llm":
            assert 0 < r["H_image"] <= r["log_K"] and 0 < r["H_text"] <= r["log_K"]
        else:
            assert r["H_image"] == r["H_all"] and math.isnan(r["H_text"])   # vision / projector: image only
    # members of a unit read the same tensor, so they have the same entropy
    h = dict(zip(stats.keys, stats.entropy()))
    assert h["llm.2.self_attn.q_proj"] == h["llm.2.self_attn.v_proj"]
    # the image/text split partitions the LLM tokens: counts add up
    i = stats.keys.index("llm.0.mlp.down_proj")
    assert torch.equal(stats.counts["image"][i] + stats.counts["text"][i], stats.counts["all"][i])
    # artifact round trip, config stored inside
    path = E.save_entropy(stats, tmp_path / E.artifact_name("entropy", "tiny", 4, len(samples), 0))
    back = E.load_entropy(path)
    assert back.config["bits"] == 4 and back.entropy() == stats.entropy()


def test_padding_is_ignored(model_and_samples):
    # the same sample alone, or batched with a longer one (so it is padded), gives the same histogram rows
    model, processor, samples = model_and_samples
    lens = [len(data.prompt(s)) for s in samples]
    short = samples[lens.index(min(lens))]
    long_ = samples[lens.index(max(lens))]
    alone = E.run_entropy(model, processor, [short], QuantConfig(), scope=("llm",))
    both = E.run_entropy(model, processor, [short, long_], QuantConfig(), scope=("llm",))
    other = E.run_entropy(model, processor, [long_], QuantConfig(), scope=("llm",))
    want = alone.counts["all"] + other.counts["all"]
    # padding is excluded exactly: every layer counts the same number of coded elements
    assert torch.equal(both.counts["all"].sum(1), want.sum(1))
    # ... and the codes agree up to float roundoff: a padded batch runs matmuls of another shape, whose summation
    # order can move an element that sits on a rounding boundary by one level (seen on some CPUs, random weights)
    moved = (both.counts["all"] - want).abs().sum(1) / 2 / want.sum(1)
    assert float(moved.max()) <= 0.005, moved


def test_bits_override_and_fp_model_rejects_16(model_and_samples):
    model, processor, samples = model_and_samples
    stats = E.run_entropy(model, processor, samples[:2], QuantConfig(a_bits=16), bits=3, scope=("projector",))
    assert stats.counts["all"].shape[1] == 8
    with pytest.raises(QVLMError):
        E.run_entropy(model, processor, samples[:2], QuantConfig(a_bits=16), scope=("projector",))
