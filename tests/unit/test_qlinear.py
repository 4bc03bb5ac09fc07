"""QuantLinear against the qvlm.core.quant reference; model swapping; quantized save / load round trips."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvlm import data as qdata
from qvlm import loading, methods, models
from qvlm.config import CalibConfig
from qvlm.core import quant
from qvlm.config import QuantConfig
from qvlm.errors import QVLMError
from qvlm.models import llava, tiny
from qvlm.core.checkpoint import QUANT_META, save_quantized
from qvlm.core.qlinear import QuantLinear, freeze_model, quant_linears, quantize_model

torch.set_num_threads(1)
SMALL = dict(vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
             text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=64)


def _layer(in_f=32, out_f=12, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin, QuantLinear.from_linear(lin, QuantConfig(**kw))


def _x(in_f=32, seed=1):
    return torch.randn(3, 7, in_f, generator=torch.Generator().manual_seed(seed))


def test_16_bits_is_the_fp_layer():
    lin, ql = _layer(w_bits=16, a_bits=16)
    x = _x()
    assert torch.equal(ql(x), lin(x))                # forward pass went well: bit-identical
    ql.freeze()
    assert torch.equal(ql(x), lin(x))


@pytest.mark.parametrize("w_symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 8, 32])
def test_weight_quant_matches_reference(group_size, w_symmetric):
    lin, ql = _layer(w_bits=4, a_bits=16, group_size=group_size, w_symmetric=w_symmetric)
    x = _x()
    ref = F.linear(x, quant.fake_quant_weight(lin.weight, 4, group_size, w_symmetric), lin.bias)
    assert torch.equal(ql(x), ref)


@pytest.mark.parametrize("a_symmetric", [True, False])
@pytest.mark.parametrize("gran", ["token", "tensor"])
def test_dynamic_act_quant_matches_reference(gran, a_symmetric):
    lin, ql = _layer(w_bits=16, a_bits=6, a_symmetric=a_symmetric, a_granularity=gran)
    x = _x()
    ref = F.linear(quant.fake_quant_act(x, 6, a_symmetric, gran), lin.weight, lin.bias)
    assert torch.equal(ql(x), ref)


@pytest.mark.parametrize("a_symmetric", [True, False])
def test_static_act_range_is_observed_min_max(a_symmetric):
    lin, ql = _layer(w_bits=16, a_bits=8, a_symmetric=a_symmetric, a_granularity="tensor")
    xs = [_x(seed=s) for s in range(3)]
    assert ql.needs_act_calibration
    ql.act.observing = True
    for x in xs:
        assert torch.equal(ql(x), lin(x))            # observing = unquantized
    ql.act.finish_observing()
    lo = min(float(x.min()) for x in xs)
    hi = max(float(x.max()) for x in xs)
    scale, zero_point = quant.qparams_from_minmax(torch.tensor(lo), torch.tensor(hi), 8, a_symmetric)
    assert torch.allclose(ql.a_scale, scale) and torch.equal(ql.a_zero_point, zero_point)
    x = _x(seed=9) * 2                               # out of the calibrated range: clipped, not rescaled
    assert torch.equal(ql(x), F.linear(quant.fake_quant_act(x, 8, a_symmetric, "tensor", scale, zero_point),
                                       lin.weight, lin.bias))


def test_observe_respects_token_mask():
    _, ql = _layer(w_bits=16, a_bits=8, a_granularity="tensor")
    x = _x()
    x[:, -1] = 100.0                                  # "padding" tokens with a huge value
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, -1] = False
    ql.act.observing, ql.act.obs_mask = True, mask
    ql(x)
    ql.act.obs_mask = None
    ql.act.finish_observing()
    assert float(ql.a_scale) < 100.0 / 127


def test_input_scale_is_exact_in_fp():
    lin, ql = _layer(w_bits=16, a_bits=16)
    s = torch.rand(32, generator=torch.Generator().manual_seed(3)) * 4 + 0.25
    ql.set_tensor("input_scale", s)
    ql.weight.data = ql.weight.data * s
    x = _x()
    assert torch.allclose(ql(x), lin(x), atol=1e-5)


def test_learned_rounding_starts_at_rtn_and_freezes():
    lin, ql = _layer(64, 16, w_bits=3, a_bits=16, group_size=16)
    rtn = ql.quant_weight().clone()
    ql.init_learned_rounding()
    h = ql.rounding_offsets()
    assert h.min() >= 0 and h.max() <= 1
    ql.round_mode = "hard"
    assert (ql.quant_weight() == rtn).float().mean() > 0.999      # ties aside, hard rounding == round-to-nearest
    ql.round_logits.data[0, 0] = 10.0                             # force one weight up
    w_hard = ql.quant_weight().clone()
    x = _x(64)
    y = ql(x)
    ql.freeze()
    assert ql.round_logits is None and ql.weight_on_grid
    assert torch.equal(ql.weight, w_hard) and torch.equal(ql(x), y)


def test_w_clip_mse_sets_the_searched_ranges_and_an_explicit_ratio_overrides_it():
    lin = nn.Linear(32, 8)
    ql = QuantLinear.from_linear(lin, QuantConfig(3, 16, w_clip="mse"))
    ref = quant.weight_qparams(lin.weight.detach(), 3, 0, True, w_clip="mse")[0]
    assert ql.w_clip == "mse" and torch.equal(ql.w_scale, ref)
    assert (ql.w_scale <= QuantLinear.from_linear(lin, QuantConfig(3, 16)).w_scale).all()
    ql.reset_weight_qparams(clip_ratio=0.5)                      # a method's own search (AWQ) wins over the rule
    assert torch.allclose(ql.w_scale, quant.weight_qparams(lin.weight.detach(), 3, 0, True, 0.5)[0])
    with pytest.raises(QVLMError, match="w_clip"):
        QuantConfig(w_clip="max")


def test_nf4_weight_format():
    lin, ql = _layer(64, 8, w_bits=4, a_bits=16, weight_format="nf4")
    x = _x(64)
    assert torch.equal(ql(x), F.linear(x, quant.fake_quant_nf4(lin.weight), lin.bias))


def test_group_size_must_divide():
    with pytest.raises(QVLMError):
        _layer(30, 4, group_size=8)


@pytest.mark.parametrize("bits", [0, 1, 17])
def test_bad_bits(bits):
    with pytest.raises(QVLMError):
        QuantLinear(8, 8, w_bits=bits)


@pytest.mark.parametrize("w_symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_export_import_round_trip(bits, w_symmetric):
    lin, ql = _layer(w_bits=bits, a_bits=8, group_size=8, w_symmetric=w_symmetric, a_granularity="tensor")
    ql.set_tensor("a_scale", torch.tensor(0.05))
    ql.set_tensor("a_zero_point", torch.tensor(0.0))
    ql.freeze()
    t = ql.export_tensors()
    assert t["qweight"].dtype == (torch.int8 if w_symmetric else torch.uint8)
    ql2 = QuantLinear(32, 12, True, **ql.spec())
    ql2.import_tensors(t)
    x = _x()
    assert torch.equal(ql2.weight, ql.weight) and torch.equal(ql2(x), ql(x))


def _small(**over):
    model, processor = tiny.build_random(0, **{**SMALL, **over})
    return model, processor


def test_quantize_model_swaps_exactly_the_scoped_linears():
    model, _ = _small()
    keys_all = [i.key for i in llava.linear_layers(model)]
    keys_llm = [i.key for i in llava.linear_layers(model, ("llm",))]
    quantize_model(model, QuantConfig(scope="llm"))
    assert len(quant_linears(model)) == len(keys_llm) < len(keys_all)
    assert type(model.lm_head) is nn.Linear
    model, _ = _small()
    quantize_model(model, QuantConfig())
    assert len(quant_linears(model)) == len(keys_all)
    assert type(model.lm_head) is nn.Linear and not isinstance(model.get_input_embeddings(), QuantLinear)
    # structure discovery sees the quantized layers under the same keys
    infos = llava.linear_layers(model)
    assert [i.key for i in infos] == keys_all and all(isinstance(i.module, QuantLinear) for i in infos)


def test_quantize_model_group_size_error_names_layer():
    model, _ = _small()
    with pytest.raises(QVLMError, match="does not divide"):
        quantize_model(model, QuantConfig(group_size=24))


def _logits(model, processor):

    b = qdata.collate(qdata.load_split("tiny", "test", limit=4), processor)
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     pixel_values=b["pixel_values"]).logits


@pytest.mark.parametrize("qcfg", [QuantConfig(4, 8, group_size=16, w_symmetric=False),
                                  QuantConfig(8, 8, a_granularity="tensor", scope="vision,llm"),
                                  QuantConfig(4, 8, w_clip="mse")])
def test_save_load_round_trip_self_contained(tmp_path, qcfg):

    model, processor = _small()
    quantize_model(model, qcfg)
    for _, m in quant_linears(model):                 # a static range and a smoothing scale travel too
        if m.needs_act_calibration:
            m.set_tensor("a_scale", torch.tensor(0.03))
            m.set_tensor("a_zero_point", torch.tensor(0.0))
        m.set_tensor("input_scale", torch.full((m.in_features,), 1.5))
    freeze_model(model)
    y = _logits(model, processor)
    out = tmp_path / "q"
    save_quantized(model, qcfg, {"method": "test"}, out, processor=processor)
    assert (out / QUANT_META).is_file()
    model2, processor2 = loading.load(str(out))      # dispatches on the marker file
    assert torch.equal(_logits(model2, processor2), y)
    assert len(quant_linears(model2)) == len(quant_linears(model))


def test_save_load_with_base_checkpoint_stores_only_what_changed(tmp_path):
    from safetensors.torch import load_file



    model, processor = _small()
    base = tmp_path / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    model, processor = models.load(str(base))
    qcfg = QuantConfig(4, 4, scope="llm")
    methods.quantize(model, processor, "rtn", qcfg, CalibConfig(n_calib=2), progress=False)
    vision_norm = [m for m in model.model.vision_tower.modules() if isinstance(m, nn.LayerNorm)][0]
    vision_norm.weight.data *= 1.5                    # a change outside the quantized scope (like VEO) is kept too
    y = _logits(model, processor)
    save_quantized(model, qcfg, {}, tmp_path / "q", base_model=str(base))
    assert not (tmp_path / "q" / "base").exists()
    keys = load_file(str(tmp_path / "q" / "quantized.safetensors")).keys()
    changed = [k for k in keys if ".language_model.layers." not in k]
    assert len(changed) == 1 and "vision_tower" in changed[0]        # nothing else outside the quantized linears
    model2, _ = loading.load(str(tmp_path / "q"))
    assert torch.equal(_logits(model2, processor), y)


def test_save_refuses_unfrozen(tmp_path):
    model, processor = _small()
    quantize_model(model, QuantConfig())
    with pytest.raises(QVLMError):
        save_quantized(model, QuantConfig(), {}, tmp_path / "q", processor=processor)
    assert not (tmp_path / "q").exists()
