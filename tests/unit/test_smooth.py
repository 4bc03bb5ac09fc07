"""qvlm.transforms.smooth: SmoothQuant scales folded into the norms keep the FP function (tiny, and a random LLaVA
with a DINOv2 tower, GQA and tied embeddings), the alpha search on calibration data never does worse than the fold
on its own objective, and it migrates a planted activation outlier into the weights.

Tolerance: each weight column is multiplied by s and each norm gain divided by s once (fp32), so logits agree to
fp32 roundoff; we allow 1e-4 of the logits' range, as for fold and rotate."""
import copy

import pytest
import torch

from random_llava import dinov2_llava

from qvlm import data, models
from qvlm.config import CalibConfig, QuantConfig
from qvlm.core.hooks import model_inputs
from qvlm.transforms import apply as apply_transform
from qvlm.transforms import smooth
from qvlm.transforms.fold import fold_norms, norm_linear_pairs

RTOL = 1e-4


def _tiny():
    model, processor = models.load("tiny")
    return model, model_inputs(model, data.collate(data.load_split("tiny", "val", limit=4), processor))


@pytest.mark.parametrize("qcfg", [None, QuantConfig(w_bits=4, a_bits=4)], ids=["alpha-0.5", "searched-W4A4"])
@pytest.mark.parametrize("build", [_tiny, dinov2_llava], ids=["tiny", "dinov2-llava-gqa-tied"])
def test_smooth_keeps_the_fp_function(build, qcfg):
    model, batch = build()
    with torch.no_grad():
        before = model(**batch).logits
    rec = smooth.smooth_norms(model, [batch], qcfg)
    with torch.no_grad():
        after = model(**batch).logits
    assert rec["n_groups"] >= 4 and rec["searched"] == (qcfg is not None)
    if qcfg is None:
        assert set(rec["alpha"].values()) == {smooth.DEFAULT_ALPHA}
    assert float((after - before).abs().max()) <= RTOL * float(before.abs().max() - before.min())


def test_alpha_search_never_worse_than_fold_and_migrates_an_outlier():
    model, batch = _tiny()
    qcfg = QuantConfig(w_bits=8, a_bits=4)
    with torch.no_grad():
        model.model.language_model.layers[1].input_layernorm.weight[7] *= 30.0      # an outlier channel of q|k|v's input
    folded = copy.deepcopy(model)
    fold_norms(folded, batch)
    smoothed = copy.deepcopy(model)
    rec = smooth.smooth_norms(smoothed, [batch], qcfg)
    name = "model.language_model.layers.1.input_layernorm"
    assert rec["alpha"][name] is not None                         # the outlier group migrates
    errs = []
    for m in (folded, smoothed):
        (_, _, lins), = [g for g in norm_linear_pairs(m, batch) if g[0] == name]
        (absmax, x), = smooth._group_stats(m, [batch], [lins[0]], seed=0).values()
        errs.append(smooth._error(x, lins, torch.ones_like(absmax), qcfg))
    assert errs[1] < errs[0]                                      # smoothed (then quantized) beats fold on its error
    assert float(smoothed.get_submodule(name).weight.detach()[7]) < 1.0    # 1/s folded into the norm: the channel shrinks


def test_smooth_through_the_transform_stage_is_recorded():
    model, processor = models.load("tiny")
    rec = apply_transform(model, processor, "smooth", CalibConfig(n_calib=8, batch_size=4),
                          qcfg=QuantConfig(w_bits=4, a_bits=8))
    assert rec["name"] == "smooth" and rec["searched"] and len(rec["alpha"]) == rec["n_groups"]
