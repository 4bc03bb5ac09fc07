"""Methods and the calibration driver: each learned method lowers its own objective vs RTN; SmoothQuant is exact
in FP; the driver's FP / quantized streams are right; determinism; other architectures; error paths."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvlm import experiments, methods
from qvlm.core import calib, quant
from qvlm import data as qdata
from qvlm.config import CalibConfig, EvalConfig, QuantConfig
from qvlm.errors import QVLMError
from qvlm.evaluate import evaluate
from qvlm.methods import mbq
from qvlm.methods.awq import search_clip
from qvlm.methods.gptq import gptq_quantize_weight, hessian_error
from qvlm.core.reconstruct import ReconConfig, objective, reconstruct
from qvlm.models import tiny
from qvlm.core.qlinear import QuantLinear

torch.set_num_threads(1)
SMALL = dict(vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
             text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=64)
# a different architecture: other widths, depths, patch size (4 image tokens), multi-query attention (1 KV head)
OTHER = dict(vision_hidden=48, vision_layers=3, vision_heads=3, vision_mlp=80,
             text_hidden=40, text_layers=3, text_heads=5, text_kv_heads=1, text_mlp=72, patch_size=16)
CAL = CalibConfig(n_calib=4, batch_size=2, seed=0)
FAST = dict(adaround=dict(iters=10), brecq=dict(iters=10), awq=dict(n_grid=5), mbq=dict(n_grid=5))


def _small(**over):
    arch = {**SMALL, **over}
    model, processor = tiny.build_random(0, **arch)
    processor.patch_size = arch.get("patch_size", tiny.ARCH["patch_size"])   # build_random keeps the default patch
    return model, processor


@pytest.fixture(scope="module")
def small():
    return _small()


def _logits(model, processor, n=4):
    b = qdata.collate(qdata.load_split("tiny", "test", limit=n), processor)
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     pixel_values=b["pixel_values"]).logits


# ------------------------------------------------------------------------------------------------ registry
def test_registry():
    for name in ("fp", "rtn", "smoothquant", "gptq", "awq", "quarot", "mbq", "adaround", "brecq"):
        assert methods.get(name).name == name
    with pytest.raises(QVLMError, match="unknown method"):
        methods.get("nope")
    with pytest.raises(QVLMError, match="no option"):
        methods.get("gptq").make_config(itres=3)


# ----------------------------------------------------------------------------- learned methods on toy layers
def _toy_layer(qcfg, in_f=48, out_f=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.3)
    xs = [torch.randn(2, 12, in_f, generator=g) for _ in range(4)]
    return lin, QuantLinear.from_linear(lin, qcfg), xs


def test_adaround_lowers_layer_objective_vs_rtn():
    lin, ql, xs = _toy_layer(QuantConfig(w_bits=3, a_bits=8))
    ys = [lin(x).detach() for x in xs]
    torch.manual_seed(0)
    st = reconstruct([ql], lambda x, i: ql(x), xs, ys, cfg=ReconConfig(iters=150))
    assert st["loss"] < st["loss_rtn"] and not st["reverted"]
    ql.freeze()
    assert objective(lambda x, i: ql(x), xs, ys) == pytest.approx(st["loss"], rel=1e-6)


@pytest.mark.parametrize("gran", ["token", "tensor"])
def test_brecq_lowers_block_objective_vs_rtn(gran):
    qcfg = QuantConfig(w_bits=3, a_bits=4, a_granularity=gran)
    lin1, q1, xs = _toy_layer(qcfg, 48, 64, seed=1)
    lin2, q2, _ = _toy_layer(qcfg, 64, 48, seed=2)
    ys = [lin2(F.gelu(lin1(x))).detach() for x in xs]
    block = lambda x, i: q2(F.gelu(q1(x)))                                     # noqa: E731
    torch.manual_seed(0)
    st = reconstruct([q1, q2], block, xs, ys, cfg=methods.get("brecq").make_config(iters=150))
    assert st["loss"] < st["loss_rtn"] and not st["reverted"]
    learned = q2.a_scale if gran == "tensor" else q2.a_clip
    assert learned is not None and not isinstance(learned, nn.Parameter)      # learned, then back to a buffer


def test_qdrop_option_runs_and_never_worse():
    lin, ql, xs = _toy_layer(QuantConfig(w_bits=3, a_bits=4))
    ys = [lin(x).detach() for x in xs]
    torch.manual_seed(0)
    st = reconstruct([ql], lambda x, i: ql(x), xs, ys, cfg=ReconConfig(iters=60, drop_prob=0.5))
    assert st["loss"] <= st["loss_rtn"] and ql.act.drop_prob == 0.0


def _tie_layer():
    """A 4-bit layer whose RTN output is its own target (loss_rtn = 0, so learning cannot improve and must revert)
    and whose weights sit on rounding ties: w / scale = k + 0.5, where round-half-to-even and h >= 0.5 differ."""
    w = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 0.2]] * 3) * 0.1       # per-row absmax 0.7: scale 0.1
    lin = nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    ql = QuantLinear.from_linear(lin, QuantConfig(w_bits=4, a_bits=16))
    xs = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        ys = [ql(x) for x in xs]
    return ql, xs, ys


def test_revert_restores_rtn_exactly_at_rounding_ties():
    ql, xs, ys = _tie_layer()
    rtn_weight = ql.quant_weight().detach().clone()
    torch.manual_seed(0)
    st = reconstruct([ql], lambda x, i: ql(x), xs, ys, cfg=ReconConfig(iters=5))
    assert st["loss_rtn"] == 0.0 and st["reverted"]
    assert st["loss"] == st["loss_rtn"]                                  # the RTN start itself, not a near copy
    assert ql.round_logits is None and torch.equal(ql.quant_weight(), rtn_weight)


def test_nan_loss_is_reverted():
    ql, xs, ys = _tie_layer()
    calls = {"n": 0}
    after_learning = range(len(xs) + 2, 2 * len(xs) + 2)   # calls: loss_rtn (len(xs)), 1 step, then the final objective

    def forward(x, i):               # NaN exactly in the objective measured after learning
        calls["n"] += 1
        y = ql(x)
        return y * float("nan") if calls["n"] in after_learning else y
    st = reconstruct([ql], forward, xs, [y + 0.01 for y in ys], cfg=ReconConfig(iters=1))
    assert st["reverted"] and st["loss"] == st["loss_rtn"]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
def test_gptq_lowers_layer_objective_vs_rtn(group_size, act_order):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 48, generator=g)
    x = torch.randn(200, 48, generator=g) @ torch.randn(48, 48, generator=g) * 0.3     # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    q, scale, zero_point = gptq_quantize_weight(w, h, 3, group_size, True, act_order=act_order)
    rtn = quant.fake_quant_weight(w, 3, group_size, True)
    assert hessian_error(w, q, h) < hessian_error(w, rtn, h)
    # Q is on the grid its (scale, zero_point) define
    assert torch.allclose(quant.fake_quant_weight(q, 3, group_size, True, scale, zero_point), q, atol=1e-6)


def test_gptq_with_mse_ranges_stays_on_its_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 48, generator=g)
    x = torch.randn(200, 48, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    q, scale, zero_point = gptq_quantize_weight(w, h, 3, 16, True, w_clip="mse")
    assert torch.allclose(quant.fake_quant_weight(q, 3, 16, True, scale, zero_point), q, atol=1e-6)
    rtn = quant.fake_quant_weight(w, 3, 16, True, *quant.weight_qparams(w, 3, 16, True, w_clip="mse"))
    assert hessian_error(w, q, h) < hessian_error(w, rtn, h)          # still lower than RTN on the same ranges


def test_awq_clip_search_never_worse_than_no_clip():
    lin, ql, xs = _toy_layer(QuantConfig(w_bits=3, a_bits=16, group_size=16))
    x = torch.cat([t.reshape(-1, 48) for t in xs])
    err = lambda: float(((ql.quant_weight() - lin.weight).detach() @ x.T).pow(2).sum())   # noqa: E731
    before = err()
    ratio = search_clip(ql, x, n_grid=10, max_shrink=0.5)
    assert err() <= before * (1 + 1e-6) and ratio.shape == (24, 3) and (ratio <= 1).all()


# ------------------------------------------------------------------------------------ driver + real blocks
def test_driver_streams_match_the_fp_model(small):
    model, processor = copy.deepcopy(small[0]), small[1]
    samples = qdata.calibration_set("tiny", 4, seed=0)
    seen = {}

    def unit_fn(data):
        seen[data.key] = data
        if data.key == "llm.0":
            assert all(torch.equal(a, b) for a, b in zip(data.inputs, data.fp_inputs))   # 16 bits: streams agree
        return {}

    b = qdata.collate(samples[:2], processor)
    with torch.no_grad():
        hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                   output_hidden_states=True).hidden_states                     # LLM hidden states
    calib.calibrate(model, processor, samples, QuantConfig(16, 16), unit_fn, batch_size=2, progress=False)
    assert list(seen) == ["vision.0", "vision.1", "projector.0", "llm.0", "llm.1"]
    assert torch.allclose(seen["llm.0"].fp_inputs[0], hs[0], atol=1e-6)        # embeddings with image features
    assert torch.allclose(seen["llm.0"].targets[0], hs[1], atol=1e-5)           # decoder layer 0 output
    assert seen["llm.0"].kwargs[0]["position_embeddings"] is not None          # RoPE passed through
    assert seen["llm.1"].masks[0].shape == b["attention_mask"].shape


@pytest.mark.parametrize("name", ["adaround", "brecq", "awq", "gptq", "quarot", "mbq"])
def test_learned_methods_lower_their_objective_in_real_blocks(small, name):
    model = copy.deepcopy(small[0])
    _, info = methods.quantize(model, small[1], name, QuantConfig(4, 8), CAL, progress=False, **FAST.get(name, {}))
    pairs = []
    for unit, st in info["blocks"].items():
        if name == "brecq":
            pairs.append((st["loss"], st["loss_rtn"]))
        else:
            pairs += [(v["loss"], v["loss_rtn"]) for k, v in st.items() if isinstance(v, dict) and "loss" in v]
    assert pairs and all(a <= b * (1 + 1e-6) for a, b in pairs)
    assert sum(a < b for a, b in pairs) >= len(pairs) // 2                      # most units strictly better


def test_smoothquant_is_exact_in_fp_and_folds_everywhere(small):
    model, processor = copy.deepcopy(small[0]), small[1]
    y = _logits(small[0], processor)
    _, info = methods.quantize(model, processor, "smoothquant", QuantConfig(16, 16), CAL, progress=False)
    assert torch.allclose(_logits(model, processor), y, atol=1e-4)
    folds = {v["fold"] for st in info["blocks"].values() for v in st.values()}
    assert folds == {"norm", "linear", "none"}    # LayerNorm/RMSNorm, v->out_proj & up->down, input scale (GQA, GELU)


def test_mbq_weights_image_and_text_tokens_by_their_gradient(small):
    model, processor = copy.deepcopy(small[0]), small[1]
    samples = qdata.calibration_set("tiny", 4, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = mbq.modality_sensitivity(model, processor, samples, batch_size=2, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())       # the model is unchanged
    assert all(p.grad is None for p in model.parameters())
    assert len(sens) == 2 and all(s["n_image"] > 0 and s["n_text"] > 0 and s["text"] > 0 for s in sens.values())
    assert sens[0]["image"] > 0                      # image tokens reach the answer through later layers' attention
    assert sens[1]["image"] == 0                     # ... but not from the last layer (causal: only its own logits)
    _, info = methods.quantize(model, processor, "mbq", QuantConfig(4, 8), CAL, progress=False, n_grid=5)
    ratios = [st["image_weight"] for k, st in info["blocks"].items() if k.startswith("llm.")]
    assert ratios == [pytest.approx(sens[i]["image"] / sens[i]["text"]) for i in range(2)]


def test_token_weights_change_the_objective():
    y, t = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])     # errors 1, 4, 2
    fwd = lambda x, i: x                                                                      # noqa: E731
    w = [torch.tensor([[3.0, 1.0, 1.0]])]
    assert objective(fwd, [y], [t]) == pytest.approx(7 / 3)
    assert objective(fwd, [y], [t], weights=w) == pytest.approx(9 / 3)


def test_static_activation_ranges_are_calibrated(small):
    model = copy.deepcopy(small[0])
    methods.quantize(model, small[1], "rtn", QuantConfig(8, 8, a_granularity="tensor"), CAL, progress=False)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert qls and all(m.a_scale is not None and m.weight_on_grid for m in qls)


@pytest.mark.parametrize("name", ["brecq", "awq", "mbq"])
def test_same_seed_same_model(small, name):
    outs = []
    for _ in range(2):
        model = copy.deepcopy(small[0])
        knobs = dict(FAST[name], **({"drop_prob": 0.5} if name == "brecq" else {}))
        methods.quantize(model, small[1], name, QuantConfig(4, 4), CAL, progress=False, **knobs)
        outs.append(_logits(model, small[1]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["fp", "rtn", "smoothquant", "gptq", "awq", "mbq", "adaround", "brecq"])
def test_other_architecture_quantizes_and_evaluates(name):
    model, processor = _small(**OTHER)
    qcfg = QuantConfig(4, 4, group_size=8)
    model, info = methods.quantize(model, processor, name, qcfg, CAL, progress=False, **FAST.get(name, {}))
    res = evaluate(model, processor, qdata.load_split("tiny", "test", limit=6), batch_size=3, progress=False)
    assert 0 <= res["accuracy"] <= 1 and info["search_seconds"] >= 0
    n_q = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_q == (0 if name == "fp" else 3 * 6 + 2 + 3 * 7)


def test_multi_block_units_and_bad_units(small):
    model, processor = copy.deepcopy(small[0]), small[1]
    samples = qdata.calibration_set("tiny", 2, seed=0)
    cfg = methods.get("brecq").make_config(iters=5)
    fn = lambda data: methods.get("brecq").quantize_unit(data, QuantConfig(4, 8), cfg)   # noqa: E731
    units = [["vision.0", "vision.1"], ["projector.0"], ["llm.0", "llm.1"]]
    stats = calib.calibrate(model, processor, samples, QuantConfig(4, 8), fn, units=units, progress=False)
    assert list(stats) == ["vision.0-1", "projector.0", "llm.0-1"]
    for bad in ([["vision.0"], ["vision.1", "projector.0"], ["llm.0", "llm.1"]], [["llm.1"], ["llm.0"]]):
        with pytest.raises(QVLMError):
            calib.calibrate(copy.deepcopy(small[0]), processor, samples, QuantConfig(4, 8), None, units=bad,
                            progress=False)


def test_smoothquant_exact_on_multi_block_units(small):
    model, processor = copy.deepcopy(small[0]), small[1]
    y = _logits(small[0], processor)
    sq = methods.get("smoothquant")
    fn = lambda data: sq.quantize_unit(data, QuantConfig(16, 16), sq.make_config())   # noqa: E731
    units = [["vision.0", "vision.1"], ["projector.0"], ["llm.0", "llm.1"]]
    calib.calibrate(model, processor, qdata.calibration_set("tiny", 2, seed=0), QuantConfig(16, 16), fn,
                    units=units, progress=False)
    assert torch.allclose(_logits(model, processor), y, atol=1e-4)


# ---------------------------------------------------------------------------------------------- error paths
def test_nan_activations_name_the_block(small):
    model = copy.deepcopy(small[0])
    model.model.language_model.layers[1].input_layernorm.weight.data.fill_(1e30)   # finite weights, Inf/NaN activations
    with pytest.raises(QVLMError, match=r"non-finite.*llm\.1"):
        methods.quantize(model, small[1], "smoothquant", QuantConfig(8, 8), CAL, progress=False)


def test_nan_weights_data_free(small):
    model = copy.deepcopy(small[0])
    model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.data[0, 0] = float("nan")
    with pytest.raises(QVLMError, match=r"vision\.0"):
        methods.quantize(model, small[1], "rtn", QuantConfig(4, 4), CAL, progress=False)


def test_empty_calibration_set(small):
    with pytest.raises(QVLMError, match="empty calibration"):
        calib.calibrate(copy.deepcopy(small[0]), small[1], [], QuantConfig(), None)
    with pytest.raises(QVLMError):
        CalibConfig(n_calib=0)


def test_group_size_not_dividing(small):
    with pytest.raises(QVLMError, match="does not divide"):
        methods.quantize(copy.deepcopy(small[0]), small[1], "rtn", QuantConfig(4, 4, group_size=24), CAL)


def test_learned_rounding_refuses_nf4(small):
    with pytest.raises(QVLMError, match="int"):
        methods.quantize(copy.deepcopy(small[0]), small[1], "adaround", QuantConfig(4, 16, weight_format="nf4"),
                         CAL, progress=False, iters=2)


def test_grid_reuses_a_row_with_the_same_run_key(small, monkeypatch):
    """grid(reuse=...) returns an earlier row for a run with the same method, config, seed, calibration and evaluation
    (relabelled, not searched again) and searches when any of them differs."""
    model, processor = small
    kw = dict(eval=EvalConfig(n_eval=4, batch_size=4), calib=CAL, progress=False)
    first = experiments.grid(model, processor, [experiments.variant("brecq", "main", iters=3)], ["W4A4"], [0], **kw)
    calls = []
    real = experiments.run_one
    monkeypatch.setattr(experiments, "run_one", lambda *a, **k: calls.append(k["knobs"]) or real(*a, **k))
    again = experiments.grid(model, processor, [experiments.variant("brecq", "sweep 3", iters=3),
                                                experiments.variant("brecq", "sweep 4", iters=4)], ["W4A4"], [0],
                             reuse=first, **kw)
    assert calls == [dict(iters=4)]                                       # only the new config was searched
    assert again[0]["variant"] == "sweep 3" and again[0]["reused_from"] == "main"
    assert again[0]["accuracy"] == first[0]["accuracy"] and again[0]["knobs"] == first[0]["knobs"]
    other_seed = experiments.grid(model, processor, [experiments.variant("brecq", "s1", iters=3)], ["W4A4"], [1],
                                  reuse=first, **kw)
    assert len(calls) == 2 and "reused_from" not in other_seed[0]


def test_table_cells_drop_only_the_learned_searches_at_deployment_settings(monkeypatch):
    """On the cpu preset the comparison table runs AdaRound / BRECQ / Q-VLM only at W8A8, W6A6, W4A4 (never dropped:
    W4A4); every other method everywhere; the gpu preset everything. grid(keep=...) runs exactly the kept cells."""
    assert [m for m in methods.METHODS if experiments.learned(m)] == ["adaround", "brecq", "qvlm"]
    cpu, gpu = experiments.table_cell("cpu"), experiments.table_cell("gpu")
    cells = [(m, s) for m in ("rtn", "gptq", "brecq", "qvlm") for s in experiments.TABLE_SETTINGS]
    dropped = [(m, s) for m, s in cells if not cpu(m, experiments.setting_of(s))]
    assert dropped == [("brecq", "W4A8"), ("brecq", "W4A16"), ("qvlm", "W4A8"), ("qvlm", "W4A16")]
    assert all(gpu(m, experiments.setting_of(s)) for m, s in cells)
    ran = []
    monkeypatch.setattr(experiments, "eval_samples", lambda ev: [])
    monkeypatch.setattr(experiments, "run_one", lambda model, proc, method, qcfg, seed, **k:
                        ran.append((method, qcfg.setting)) or dict(method=method, setting=qcfg.setting, seed=seed))
    experiments.grid(None, None, ["gptq", "qvlm+rotate"], ["W4A16", "W4A4"], [0], keep=cpu, progress=False)
    assert ran == [("gptq", "W4A16"), ("gptq", "W4A4"), ("qvlm", "W4A4")]


def test_row_cache_resumes_a_stopped_grid(small, tmp_path, monkeypatch):
    """grid(cache=DIR) stores every finished run; run again (a resumed run) it reads each back, exactly, instead of
    searching; another seed, another FP model or other code is not a hit. $QVLM_ROW_CACHE names the default DIR."""
    model, processor = small
    kw = dict(eval=EvalConfig(n_eval=4, batch_size=4), calib=CAL, progress=False)
    brecq = [experiments.variant("brecq", iters=3)]
    first = experiments.grid(model, processor, brecq, ["W4A4"], [0, 1], cache=tmp_path, **kw)
    assert experiments.RowCache.count(tmp_path) == 2
    calls = []
    monkeypatch.setattr(experiments, "run_one", lambda m, p, method, q, seed, **k: calls.append(seed) or
                        dict(method=method, setting=q.setting, seed=seed, accuracy=0.0))
    monkeypatch.setenv(experiments.ROW_CACHE_ENV, str(tmp_path))
    again = experiments.grid(model, processor, brecq, ["W4A4"], [0, 1], **kw)      # the cache from the environment
    assert calls == []
    for a, b in zip(first, again):
        assert b.pop("resumed_from").startswith(str(tmp_path)) and repr(b) == repr(a)   # info, tuples and all
    experiments.grid(model, processor, brecq, ["W4A4"], [2], **kw)
    assert calls == [2] and experiments.RowCache.count(tmp_path) == 3
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    experiments.grid(other, processor, brecq, ["W4A4"], [0], **kw)
    monkeypatch.setattr(experiments, "code_hash", lambda: "f" * 64)
    experiments.grid(model, processor, brecq, ["W4A4"], [0], **kw)
    assert calls == [2, 0, 0] and experiments.RowCache.count(tmp_path) == 1     # the edited code's own directory
