"""qvlm.transforms.fold: folding norm gains into the reading linears keeps the FP function (tiny, and a random LLaVA
with a DINOv2 tower, GQA and tied embeddings), leaves gains of 1, and undoes an injected outlier reparameterisation.

Tolerance: the fold multiplies each weight column by its gain once, so logits agree to fp32 roundoff; we allow
1e-4 of the logits' range (measured: ~1e-6 of it)."""
import copy

import pytest
import torch

from random_llava import dinov2_llava

from qvlm import data, models
from qvlm.core.hooks import model_inputs
from qvlm.testbed.outliers import inject, input_absmax
from qvlm.transforms import apply as apply_transform
from qvlm.transforms.fold import fold_norms

RTOL = 1e-4


def _dinov2_llava():
    return dinov2_llava()


def _tiny():
    model, processor = models.load("tiny")
    return model, model_inputs(model, data.collate(data.load_split("tiny", "val", limit=4), processor))


@pytest.mark.parametrize("build", [_tiny, _dinov2_llava], ids=["tiny", "dinov2-llava-gqa-tied"])
def test_fold_keeps_the_fp_function(build):
    model, batch = build()
    with torch.no_grad():
        before = model(**batch).logits
    rows = fold_norms(model, batch)
    with torch.no_grad():
        after = model(**batch).logits
    assert rows and all(r["n_linears"] >= 1 for r in rows)
    assert float((after - before).abs().max()) <= RTOL * float(before.abs().max())
    final = model.model.language_model.norm                      # feeds the (tied) lm_head: left alone
    assert not torch.all(final.weight == 1) or not any(r["norm"].endswith("language_model.norm") for r in rows)
    folded = {r["norm"] for r in rows}
    for name, m in model.named_modules():
        if name in folded:
            assert torch.all(m.weight == 1)


def test_fold_undoes_an_injected_outlier_channel():
    model, batch = _tiny()
    probe = model.model.language_model.layers[0].self_attn.q_proj
    clean = input_absmax(model, batch, probe)
    inj = copy.deepcopy(model)
    inject(inj, batch, 12.0)
    probe_inj = inj.model.language_model.layers[0].self_attn.q_proj
    assert float(input_absmax(inj, batch, probe_inj).max()) > 5 * float(clean.max())
    fold_norms(model, batch)
    fold_norms(inj, batch)
    a, b = input_absmax(model, batch, probe), input_absmax(inj, batch, probe_inj)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)                 # identical inputs after the fold


def test_registry_applies_fold_and_rejects_unknown():
    model, processor = models.load("tiny")
    rec = apply_transform(model, processor, "fold")
    assert rec["name"] == "fold" and rec["n_norms"] > 0
    with pytest.raises(Exception, match="unknown transform"):
        apply_transform(model, processor, "rotate-everything")
