"""qvlm.testbed.outliers: the outlier-channel reparameterisation keeps the FP function, creates outlier input
channels where the norms feed linears (found by tracing, on any width/depth), and is applied at most once."""
import json
import shutil

import pytest
import torch

from qvlm import data
from qvlm.models import llava, tiny
from qvlm.testbed import outliers

ARCH = dict(vision_hidden=48, vision_layers=2, vision_heads=3, vision_mlp=80,
            text_hidden=64, text_layers=3, text_heads=4, text_kv_heads=2, text_mlp=96)


def _batch(processor):
    b = data.collate(data.load_split("tiny", "train", limit=3), processor)
    return {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def test_inject_keeps_the_function_and_makes_outliers():
    model, processor = tiny.build_random(0, **ARCH)
    b = _batch(processor)
    probe = next(li for li in llava.linear_layers(model) if li.part == "llm" and li.short.endswith("q_proj"))
    before_x = outliers.input_absmax(model, b, probe.module)
    with torch.no_grad():
        before = model(**b).logits
    rows = outliers.inject(model, b, scale=16.0, frac=1 / 32)
    # two norms feed linears in each transformer block of both towers; lm_head's final norm is excluded
    assert len(rows) == 2 * (ARCH["vision_layers"] + ARCH["text_layers"])
    assert {r["n_linears"] for r in rows} == {1, 2, 3}      # fc1 | gate+up | q+k+v
    with torch.no_grad():
        after = model(**b).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    after_x = outliers.input_absmax(model, b, probe.module)
    ratio = after_x / before_x
    assert int((ratio > 8).sum()) == max(1, round(ARCH["text_hidden"] / 32))   # the chosen channels, 16x
    assert torch.allclose(ratio[ratio < 8], torch.ones_like(ratio[ratio < 8]), rtol=1e-4)


def test_bad_scale_is_refused():
    model, processor = tiny.build_random(0, **ARCH)
    with pytest.raises(Exception, match="out of range"):
        outliers.inject(model, _batch(processor), scale=0.5)


def test_cli_refuses_a_second_application(tmp_path, capsys):
    ckpt = tmp_path / "m"
    shutil.copytree(tiny_dir(), ckpt)
    rec = json.loads((ckpt / "testbed.json").read_text())
    assert "outliers" not in rec and rec["outliers_removed"]["scale"] == 12.0   # shipped clean; the removal recorded
    rec["outliers"] = rec["outliers_removed"]
    (ckpt / "testbed.json").write_text(json.dumps(rec))
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(Exception, match="already has outlier channels"):
        outliers.main(["--model", str(ckpt), "--scale", "2"])
    assert (ckpt / "model.safetensors").read_bytes() == before


def tiny_dir():
    from qvlm.paths import TINY_DIR
    return TINY_DIR
