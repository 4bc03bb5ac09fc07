"""compressed-tensors export: transformers' from_pretrained reloads it with our fake-quant weights bit for bit and
the accuracy on `tiny` of the fake-quant model; settings with no equivalent, corrupt files and bad CLI input give
one-line errors and write nothing."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from qvlm import cli, loading, methods, transforms
from qvlm import data as qdata
from qvlm.config import CalibConfig
from qvlm.core.qlinear import quant_linears
from qvlm.deploy.export import EXPORT_META, _from_pretrained, export_compressed_tensors, load_export
from qvlm.errors import QVLMError
from qvlm.evaluate import predict
from qvlm.experiments import setting_of
from qvlm.models import load
from random_llava import dinov2_llava

torch.set_num_threads(1)
N_EVAL = 200
# Dynamic int8 activations: compressed-tensors' per-token step is absmax / 127.5, ours absmax / 127 (module
# docstring), a 0.4 % coarser grid: predictions may differ on a few near-ties, so agreement is bounded, not exact.
MIN_DYNAMIC_AGREEMENT = 0.97


@pytest.fixture(scope="module")
def tiny():
    model, processor = load("tiny")
    return model, processor, qdata.load_split("tiny", "test")[:N_EVAL]


def _quantized(tiny, setting, method="rtn", **qkw):
    model, processor, _ = tiny
    qcfg = dataclasses.replace(setting_of(setting), **qkw)
    m, _ = methods.quantize(copy.deepcopy(model), processor, method, qcfg, CalibConfig(n_calib=8))
    return m


def _static_steps(m):
    """Give every activation quantizer a static per-tensor step (what an LSQ-calibrated method leaves behind)."""
    for _, ql in quant_linears(m):
        ql.act.a_granularity = "tensor"
        ql.set_tensor("a_scale", torch.tensor(0.02 + 0.001 * ql.in_features % 7))
        ql.set_tensor("a_zero_point", torch.tensor(0.0))
    return m


@pytest.mark.parametrize("setting,method,qkw,fmt", [
    ("W4A16", "rtn", {}, "pack-quantized"),
    ("W4A16G32", "gptq", {}, "pack-quantized"),                  # learned (GPTQ) codes, groups of 32
    ("W8A8", "rtn", {}, "int-quantized"),                         # dynamic per-token activations
    ("W8A8", "rtn", dict(w_symmetric=False), "int-quantized"),   # asymmetric weights: signed zero points
    ("W8A8", "static", {}, "int-quantized"),                      # static per-tensor activation steps
])
def test_export_reloads_bit_exact_with_the_same_accuracy(tiny, tmp_path, setting, method, qkw, fmt):
    _, processor, samples = tiny
    m = _static_steps(_quantized(tiny, setting)) if method == "static" else _quantized(tiny, setting, method, **qkw)
    summary = export_compressed_tensors(m, tmp_path / "ct", processor=processor)
    assert summary["weights_bit_exact"] and {g["scheme"]["format"] for g in summary["groups"].values()} == {fmt}
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    reloaded, proc2 = loading.load(str(tmp_path / "ct"))            # dispatches on qvlm_export.json
    mods = dict(reloaded.named_modules())
    for name, ql in quant_linears(m):                                # bit for bit, every layer
        assert torch.equal(mods[name].weight, ql.quant_weight()), name
    fake, back = predict(m, processor, samples), predict(reloaded, proc2, samples)
    agree = sum(a == b for a, b in zip(fake, back)) / len(samples)
    if setting.endswith("A16") or method == "static":               # same weights, same activation codes
        assert agree == 1.0
    else:
        assert agree >= MIN_DYNAMIC_AGREEMENT


def test_reloaded_w8a8_layers_quantize_their_input(tiny, tmp_path):
    """The reload is not a weight-only model: compressed-tensors quantizes each input per token on the fly."""
    _, processor, _ = tiny
    m = _quantized(tiny, "W8A8")
    export_compressed_tensors(m, tmp_path / "ct", processor=processor)
    reloaded, _ = load_export(tmp_path / "ct")
    name, ql = quant_linears(m)[-1]
    layer = dict(reloaded.named_modules())[name]
    x = torch.randn(3, 7, ql.in_features) * 4
    with torch.no_grad():
        ours, theirs, unquantized = ql(x), layer(x), F.linear(x, layer.weight, layer.bias)
    assert not torch.allclose(theirs, unquantized, rtol=0, atol=1e-6)          # activations were quantized
    rel = float((theirs - ours).norm() / ours.norm())
    assert rel < 0.02, rel                                           # int8 grids 127 vs 127.5 apart: a small gap


@pytest.mark.parametrize("setting,qkw,match", [
    ("W4A4", {}, r"W4A4: 4-bit activations .* closest exportable setting: W4A16"),
    ("W6A6", {}, r"closest exportable setting: W8A8"),
    ("W4A16", dict(w_symmetric=False), r"asymmetric pack-quantized"),
    ("W8A8", dict(a_symmetric=False), r"asymmetric activations"),
])
def test_settings_without_an_equivalent_raise_and_write_nothing(tiny, tmp_path, setting, qkw, match):
    m = _quantized(tiny, setting, **qkw)
    with pytest.raises(QVLMError, match=match):
        export_compressed_tensors(m, tmp_path / "ct")
    assert not (tmp_path / "ct").exists() and not list(tmp_path.iterdir())


def test_learned_clip_and_rotation_are_refused(tiny, tmp_path):
    m = _quantized(tiny, "W8A8")
    _, ql = quant_linears(m)[0]
    ql.set_tensor("a_clip", torch.tensor(0.8))
    with pytest.raises(QVLMError, match="learned activation clip.*--learn-act false"):
        export_compressed_tensors(m, tmp_path / "a")
    model, processor, _ = tiny
    r = copy.deepcopy(model)
    transforms.apply(r, processor, "rotate", CalibConfig(n_calib=4))
    r, _ = methods.quantize(r, processor, "rtn", setting_of("W4A16"), CalibConfig(n_calib=4))
    with pytest.raises(QVLMError, match="rotation"):
        export_compressed_tensors(r, tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_corrupt_or_truncated_export_fails_with_one_line(tiny, tmp_path):
    _, processor, _ = tiny
    export_compressed_tensors(_quantized(tiny, "W4A16"), tmp_path / "ct", processor=processor)
    weights = tmp_path / "ct" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])                        # truncated
    with pytest.raises(QVLMError, match="checksum") as e:
        load_export(tmp_path / "ct")
    assert "\n" not in str(e.value)
    weights.unlink()
    with pytest.raises(QVLMError, match="missing model.safetensors"):
        load_export(tmp_path / "ct")
    (tmp_path / "ct" / EXPORT_META).write_text("{")
    with pytest.raises(QVLMError, match="not valid JSON"):
        load_export(tmp_path / "ct")
    with pytest.raises(QVLMError, match="not a compressed-tensors export"):
        load_export(tmp_path)


def test_cli_export_and_eval(tmp_path, capsys):
    q, ct, bad = tmp_path / "q", tmp_path / "ct", tmp_path / "bad"
    fast = ["--calib", "4", "--calib-batch-size", "2", "--limit", "8", "--batch-size", "8"]
    assert cli.main(["quantize", "--model", "tiny", "--method", "rtn", "--w-bits", "8", "--a-bits", "8",
                     "--out", str(q), *fast]) == 0
    assert cli.main(["export", str(q), "--format", "compressed-tensors", "--out", str(ct)]) == 0
    assert (ct / EXPORT_META).is_file() and "int-quantized" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(ct), "--limit", "8", "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(ct), "--format", "compressed-tensors", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qvlm: error:") and "already a compressed-tensors export" in err[-1]
    q4 = tmp_path / "q4"
    assert cli.main(["quantize", "--model", "tiny", "--method", "rtn", "--w-bits", "4", "--a-bits", "4",
                     "--out", str(q4), *fast]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(q4), "--format", "compressed-tensors", "--out", str(bad)]) == 2
    assert "closest exportable setting: W4A16" in capsys.readouterr().err and not bad.exists()


def test_dinov2_tower_with_tied_embeddings_reloads(tmp_path):
    """SmolLM2 + DINOv2 (smol): transformers 5 runs DINOv2's _init_weights over the reloaded compressed linears,
    which have no `weight`; the export's loader spares them, and the tied lm_head comes back tied."""
    model, batch = dinov2_llava(0)
    qcfg = setting_of("W4A16")
    m, _ = methods.quantize(model, None, "rtn", qcfg, CalibConfig(n_calib=1), progress=False)
    summary = export_compressed_tensors(m, tmp_path / "ct")
    assert summary["weights_bit_exact"]
    back = _from_pretrained(tmp_path / "ct")
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, m(**batch).logits, rtol=1e-4, atol=1e-4)
