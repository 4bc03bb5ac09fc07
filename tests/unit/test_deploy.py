"""qvlm.deploy: a packed (kernel-backed) model computes what its fake-quant model computes, round-trips through
its checkpoint, reports its memory, and `qvlm deploy` fails with one line and no output on bad input.

Without CUDA the packed layers run the Triton kernels in the CPU interpreter (TRITON_INTERPRET=1 is set here,
before `kernels` is imported, as tests/kernels/conftest.py does); if `kernels` was already imported without it,
they run the torch `*_ref` functions, which compute the same integers. Sizes are tiny: the interpreter is slow.

Tolerances. One layer: the integer GEMM is exact and only the rescale order differs from F.linear, so the packed
output equals the fake-quant output to fp32 roundoff (`kernels.testing.gemm_tolerance`, with 4x slack for the
float64-vs-fp32 rescale). Whole model: a roundoff-size difference can move a value across an activation rounding
boundary in a later layer, which changes that code by one step; we therefore compare logits loosely (2 % of
their range) and the per-layer contract exactly.
"""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qvlm import cli, data, deploy, experiments, loading, methods, models  # noqa: E402
from qvlm import evaluate  # noqa: E402
from qvlm.config import CalibConfig, EvalConfig, QuantConfig  # noqa: E402
from qvlm.errors import QVLMError  # noqa: E402
from qvlm.models import llava, tiny  # noqa: E402
from qvlm.core.checkpoint import QUANT_META, save_quantized  # noqa: E402
from qvlm.core.qlinear import QuantLinear, quant_linears  # noqa: E402

torch.set_num_threads(1)
SMALL = dict(vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
             text_hidden=32, text_layers=1, text_heads=4, text_kv_heads=2, text_mlp=64)


def _quantized(w_bits=4, a_bits=4, group_size=0, **kw):
    model, processor = tiny.build_random(0, **SMALL)
    methods.quantize(model, processor, "rtn", QuantConfig(w_bits=w_bits, a_bits=a_bits, group_size=group_size, **kw),
                     progress=False)
    return model, processor


@pytest.fixture(scope="module")
def batch():
    _, processor = tiny.build_random(0, **SMALL)
    return data.collate(data.load_split("tiny", "test", limit=2), processor)


def _logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     pixel_values=b["pixel_values"]).logits


def _record_io(model, b):
    """{layer name: (input, output)} of every QuantLinear during one forward pass."""
    io, hooks = {}, []
    for name, m in quant_linears(model):
        hooks.append(m.register_forward_hook(lambda mod, a, y, name=name: io.__setitem__(name, (a[0], y))))
    _logits(model, b)
    for h in hooks:
        h.remove()
    return io


def _layer_tol(y_ref, x, layer):
    from kernels.testing import gemm_tolerance
    w = layer.dequantized_weight()
    x2 = x.reshape(-1, w.shape[1]).float()
    if layer.input_scale is not None:
        x2 = x2 / layer.input_scale.float()
    return 4 * gemm_tolerance(y_ref.reshape(-1, w.shape[0]), x2.abs() * 1.01 + 1e-6, w, torch.float32) + 1e-6


@pytest.mark.parametrize("w_bits,a_bits,group_size,w_symmetric",
                         [(4, 16, 0, True), (8, 8, 16, True), (4, 4, 0, True), (4, 4, 16, False)],
                         ids=["w4a16", "w8a8-g16", "w4a4", "w4a4-g16-asym"])
def test_packed_model_equals_fake_quant(batch, w_bits, a_bits, group_size, w_symmetric):
    model, _ = _quantized(w_bits, a_bits, group_size, w_symmetric=w_symmetric)
    io = _record_io(model, batch)
    fake = _logits(model, batch)
    deploy.deploy(model)
    assert not quant_linears(model) and len(deploy.packed_linears(model)) == len(io)
    assert set(model.qvlm_deploy["modes"]) == {"w4a16" if a_bits == 16 else ("w8a8" if a_bits == 8 else "w4a4")}
    for name, (x, y) in io.items():                      # each layer: same inputs -> same outputs (fp32 roundoff)
        layer = model.get_submodule(name)
        with torch.no_grad():
            got = layer(x)
        err = (got - y).abs().reshape(-1, y.shape[-1])
        assert bool((err <= _layer_tol(y, x, layer)).all()), f"{name}: max |diff| {float(err.max()):.3g}"
    packed = _logits(model, batch)                       # whole model: loose (rounding-boundary flips, see top)
    assert (packed - fake).abs().max() <= 0.02 * (fake.max() - fake.min()), float((packed - fake).abs().max())


def _single(ql):
    """A one-layer 'model' (deploy works on any module holding QuantLinears)."""
    return torch.nn.Sequential(ql)


def _ql(w_bits=4, a_bits=4, group_size=0, seed=0, **kw):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 24)
    return QuantLinear.from_linear(lin, QuantConfig(w_bits=w_bits, a_bits=a_bits, group_size=group_size, **kw))


@pytest.mark.parametrize("variant", ["learned_rounding", "frozen_learned_rounding", "a_clip", "static_a_scale",
                                     "dynamic_per_tensor", "input_scale", "w3a3"])
def test_layer_variants_keep_the_codes_they_use(variant):
    """Learned rounding (frozen or not), a learned activation clip, a static activation step and an unfoldable
    smoothing scale all survive packing: the packed layer computes the QuantLinear's output."""
    ql = _ql(3, 3) if variant == "w3a3" else _ql(4, 8 if variant == "static_a_scale" else 4, group_size=16)
    x = torch.randn(2, 5, 64) * 3
    if "rounding" in variant:
        ql.init_learned_rounding()
        ql.round_logits.data = torch.randn_like(ql.round_logits) * 4       # far from round-to-nearest
        ql.round_mode = "hard"
        assert not torch.equal(ql.quant_weight(), QuantLinear.from_linear(torch.nn.Linear(64, 24), QuantConfig())
                               .quant_weight())
        if variant.startswith("frozen"):
            ql.freeze()
    elif variant == "a_clip":
        ql.set_tensor("a_clip", torch.tensor(0.6))
    elif variant == "static_a_scale":
        ql.act.a_granularity = "tensor"
        ql.set_tensor("a_scale", torch.tensor(0.05))
        ql.set_tensor("a_zero_point", torch.tensor(0.0))
    elif variant == "dynamic_per_tensor":
        ql.act.a_granularity = "tensor"
    elif variant == "input_scale":
        ql.set_tensor("input_scale", torch.rand(64) + 0.5)
    with torch.no_grad():
        y = ql(x)
        model = deploy.deploy(_single(ql))
        got = model[0](x)
    assert type(model[0]).__name__ == "DeployedLinear"
    if variant in ("a_clip", "static_a_scale"):
        assert model[0].act == ("clip" if variant == "a_clip" else "static")
        assert model[0].kernel_act_args(), "learned clip / static step: codes come from the act_quant kernel"
        assert not model.qvlm_deploy["notes"]
    if variant == "dynamic_per_tensor":                                    # a reduction over all tokens: torch codes
        assert model[0].act == "tensor" and model[0].kernel_act_args() is None
        assert "per-tensor" in model.qvlm_deploy["notes"][0]
    err = (got - y).abs().reshape(-1, y.shape[-1])
    assert bool((err <= _layer_tol(y, x, model[0])).all()), f"{variant}: max |diff| {float(err.max()):.3g}"


@pytest.mark.parametrize("kw,match", [(dict(a_symmetric=False), "asymmetric activations"),
                                      (dict(weight_format="nf4"), "nf4"),
                                      (dict(w_bits=8, a_bits=16), "no packed kernel")])
def test_unsupported_schemes_raise_and_change_nothing(kw, match):
    bits = dict(w_bits=kw.pop("w_bits", 4), a_bits=kw.pop("a_bits", 4))
    model = _single(_ql(**bits, **kw))
    with pytest.raises(QVLMError, match=match):
        deploy.deploy(model)
    assert isinstance(model[0], QuantLinear)
    with pytest.raises(QVLMError, match="no QuantLinear"):
        deploy.deploy(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_fp_layers_become_plain_linear():
    ql = _ql(16, 16)
    ql.set_tensor("input_scale", torch.rand(64) + 0.5)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = ql(x)
        model = deploy.deploy(_single(ql))
        torch.testing.assert_close(model[0](x), y, rtol=1e-5, atol=1e-5)
    assert type(model[0]) is torch.nn.Linear and model.qvlm_deploy["fp_linears"] == 1


def test_checkpoint_round_trip(batch, tmp_path):
    model, processor = _quantized(4, 4, 0)
    deploy.deploy(model)
    before = _logits(model, batch)
    out = deploy.save_packed(model, tmp_path / "packed", processor=processor, source={"test": True})
    meta = json.loads((out / deploy.PACKED_META).read_text())
    assert meta["scheme"]["name"] == "w4a4" and meta["scheme"]["kernels"] == {"w4a4": len(meta["layers"])}
    for loaded, _ in (deploy.load_packed(out), loading.load(str(out))):       # loading.load detects the packed dir
        assert len(deploy.packed_linears(loaded)) == len(meta["layers"])
        assert torch.equal(_logits(loaded, batch), before)                       # same tensors, same code path


def test_checkpoint_round_trip_with_tied_embeddings(batch, tmp_path):
    """SmolLM2 ties lm_head to the embeddings: safetensors refuses shared tensors, so the alias is stored in meta."""
    model, processor = tiny.build_random(0, **SMALL)
    model.lm_head.weight = model.get_input_embeddings().weight
    for cfg in (model.config, model.config.text_config):
        cfg.tie_word_embeddings = True
    methods.quantize(model, processor, "rtn", QuantConfig(w_bits=4, a_bits=4), progress=False)
    deploy.deploy(model)
    before = _logits(model, batch)
    out = deploy.save_packed(model, tmp_path / "packed", processor=processor)
    meta = json.loads((out / deploy.PACKED_META).read_text())
    assert meta["tied"] == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    loaded, _ = deploy.load_packed(out)
    assert torch.equal(_logits(loaded, batch), before)
    assert llava.tied_embeddings(loaded)


def test_memory_report(tmp_path):
    """Testbed-sized widths (96..384; SMALL's 32-wide layers pay 4 bytes of scale per 32 weights)."""
    model, processor = tiny.build_random(0)
    methods.quantize(model, processor, "rtn", QuantConfig(w_bits=4, a_bits=16), progress=False)
    deploy.deploy(model)
    out = deploy.save_packed(model, tmp_path / "packed", processor=processor)
    rep = deploy.memory_report(model, out)
    cats = {r["category"] for r in rep["rows"]}
    assert {"linear codes", "linear scales / zero points", "embeddings", "lm_head", "norms"} <= cats
    assert rep["linear"]["fraction"] < 0.3, rep["linear"]                       # W4: 0.25 + fp32 scales
    codes = next(r for r in rep["rows"] if r["category"] == "linear codes")
    assert codes["bytes"] * 4 == codes["fp16_bytes"]                            # two codes per byte, exactly
    assert rep["total"]["bytes"] < rep["total"]["fp16_bytes"] * 2               # the FP rest is fp32 here
    assert rep["disk"]["tensor_file_bytes"] >= sum(r["disk_bytes"] for r in rep["rows"])
    ref = deploy.formula_bytes(deploy.reference_model("llava-1.5-7b"), w_bits=4, group_size=128)
    assert ref["n_linears"] == 24 * 6 + 2 + 32 * 7 and ref["linear_ratio"] >= 3.7   # discovered: 370 linears, W4 g128
    assert 3.0 < ref["model_ratio"] < ref["linear_ratio"]                       # embeddings / lm_head stay FP16


def _err_line(err):
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("qvlm: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_deploy_and_its_errors(tmp_path, capsys):
    model, processor = _quantized(4, 16, 0)
    qdir = save_quantized(model, QuantConfig(w_bits=4, a_bits=16), {"method": "rtn"}, tmp_path / "q",
                          processor=processor)
    out, js = tmp_path / "packed", tmp_path / "mem.json"
    assert cli.main(["deploy", str(qdir), "--out", str(out), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert (out / deploy.PACKED_META).is_file() and res["scheme"]["kernels"] == {"w4a16": 15}
    assert 0 < res["memory"]["linear"]["fraction"] < 0.5
    capsys.readouterr()
    bad_out = tmp_path / "never"
    cases = [(tmp_path / "missing", "not found"), (tmp_path, "not a quantized-model directory"),
             (out, "already a packed model")]
    for src, msg in cases:
        assert cli.main(["deploy", str(src), "--out", str(bad_out)]) == 2
        assert msg in _err_line(capsys.readouterr().err)
        assert not bad_out.exists()
    asym, processor = _quantized(4, 4, 0, a_symmetric=False)
    qdir2 = save_quantized(asym, QuantConfig(w_bits=4, a_bits=4, a_symmetric=False), {"method": "rtn"},
                           tmp_path / "q2", processor=processor)
    assert cli.main(["deploy", str(qdir2), "--out", str(bad_out)]) == 2
    assert "asymmetric activations" in _err_line(capsys.readouterr().err)
    assert not bad_out.exists() and not list(tmp_path.glob(".never*"))      # no half-written output


def test_cpu_deploy_never_touches_the_gpu(batch):
    """On a CPU model nothing is moved to (or initialises) CUDA: packing and the forward stay on the CPU."""
    model, _ = _quantized(4, 4, 0)
    deploy.deploy(model)
    _logits(model, batch)
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    assert not torch.cuda.is_initialized()


@pytest.mark.gpu
def test_gpu_kernels_match_fake_quant(batch):
    """On CUDA the real Triton kernels (fp32 activations) give the fake-quant logits (skipped without a GPU)."""
    model, _ = _quantized(4, 4, 0)
    model.cuda()
    b = {k: v.cuda() for k, v in batch.items() if torch.is_tensor(v)}
    fake = _logits(model, b)
    deploy.deploy(model)
    assert deploy.backend("cuda") == "triton (cuda)"
    assert (_logits(model, b) - fake).abs().max() <= 0.02 * (fake.max() - fake.min())


def test_deploying_run_observes_without_perturbing():
    """The capture hooks of experiments.run_one(deploy=True) must not change what the fake-quant model predicts (a
    forward hook that returns a value replaces the layer's output), and the layer-local check must pass."""
    model, processor = models.load("tiny")
    samples = data.load_split("tiny", "val", limit=12)
    ev = EvalConfig(batch_size=12)
    row = experiments.run_one(model, processor, "rtn", "W4A4", samples=samples, eval=ev, deploy=True, keep_model=True)
    plain = experiments.run_one(model, processor, "rtn", "W4A4", samples=samples, eval=ev, keep_model=True)
    assert row["info"]["predictions"]["fake"] == evaluate.predict(plain["model_object"], processor, samples, 12,
                                                                  progress=False)
    assert row["layer_max_rel_err"] <= deploy.layer_rtol(torch.float32)
    assert row["agreement"] >= 0.9 and row["scheme"] == "w4a4"


def test_layerwise_check_catches_a_wrong_layer(batch):
    model, _ = _quantized(4, 4)
    io = {n: (x.reshape(-1, x.shape[-1])[:8], y.reshape(-1, y.shape[-1])[:8]) for n, (x, y) in _record_io(model, batch).items()}
    deploy.deploy(model)
    assert deploy.layerwise_check(model, io)["max_rel_err"] <= deploy.layer_rtol(torch.float32)
    name = next(iter(io))
    model.get_submodule(name).scale.mul_(1.01)               # a 1 % scale error: far above roundoff
    bad = deploy.layerwise_check(model, io)
    assert bad["max_rel_err"] > deploy.layer_rtol(torch.float32) and bad["worst_layer"] == name


def test_twin_check_on_the_packed_pass_catches_a_wrong_layer(batch):
    """run_one's layer-local check: the packed pass's own (input, output) rows against the fake-quant twins."""
    model, _ = _quantized(4, 4)
    twins = dict(quant_linears(model))
    deploy.deploy(model)
    io = {n: (x.reshape(-1, x.shape[-1])[:8], y.reshape(-1, y.shape[-1])[:8]) for n, (x, y) in
          _record_io_of(model, batch, twins).items()}
    assert deploy.twin_check(model, twins, io)["max_rel_err"] <= deploy.layer_rtol(torch.float32)
    name = next(iter(io))
    twins[name].weight.data.mul_(1.01)                        # (frozen: weight holds the grid) twin != packed
    bad = deploy.twin_check(model, twins, io)
    assert bad["max_rel_err"] > deploy.layer_rtol(torch.float32) and bad["worst_layer"] == name


def _record_io_of(model, b, names):
    io, hooks = {}, []
    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda mod, a, y, name=name: io.__setitem__(name, (a[0], y))))
    _logits(model, b)
    for h in hooks:
        h.remove()
    return io


def test_rotated_model_deploys_with_the_online_hadamard(tmp_path):
    """QuaRot's online Hadamard on down_proj survives deployment: the packed layers rotate their input (the Triton
    FWHT kernel in the interpreter), the layer-local contract holds, predictions agree, and the packed checkpoint
    round-trips with the rotation."""
    model, processor = models.load("tiny")
    samples = data.load_split("tiny", "val", limit=12)
    row = experiments.run_one(model, processor, "rtn", "W4A4", transform="rotate", samples=samples,
                              eval=EvalConfig(batch_size=12), deploy=True, keep_model=True, fused=True)
    packed = row["model_object"]
    downs = [m for n, m in deploy.packed_linears(packed) if n.endswith("mlp.down_proj")]
    assert downs and all(m.input_transform == "hadamard" for m in downs)
    assert row["layer_max_rel_err"] <= deploy.layer_rtol(torch.float32)
    assert row["agreement"] >= 0.9
    assert row["fused_groups"] > 0 and row["fused_agreement"] == 1.0      # one GEMM per input tensor, same answers
    b = data.collate(samples[:2], processor)
    back, _ = deploy.load_packed(deploy.save_packed(packed, tmp_path / "p", processor=processor))
    assert all(m.input_transform == "hadamard" for n, m in deploy.packed_linears(back) if n.endswith("mlp.down_proj"))
    assert torch.equal(_logits(back, b), _logits(packed, b))


def test_every_method_packs_to_its_fake_quant_model(setting="W4A4"):
    """Every method of the accuracy table (notebook 05) leaves layers the packed kernels run exactly: each packed
    layer fed its fake twin's input gives its output to fp32 roundoff, and the fused q|k|v / gate|up copy answers
    as the unfused packed model (notebook 06 shows the same table on smol)."""
    model, processor = tiny.build_random(0, **SMALL)
    samples = data.load_split("tiny", "val", limit=6)
    for name in experiments.table_methods():
        v = experiments.variant(name)
        knobs = experiments.method_knobs(v["method"], dict(iters=2, veo_iters=2, n_guard=8))
        row = experiments.run_one(model, processor, v["method"], setting, transform=v["transform"] or "none",
                                  samples=samples, eval=EvalConfig(batch_size=6), deploy=True, fused=True,
                                  knobs=knobs, calib=CalibConfig(n_calib=4, batch_size=4))
        assert row["layer_max_rel_err"] <= deploy.layer_rtol(torch.float32), (name, row["layer_max_rel_err"])
        assert row["fused_groups"] > 0 and row["fused_agreement"] == 1.0, name
