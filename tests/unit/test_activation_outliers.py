"""qvlm.analysis.outliers: the outlier picture is read-only, finds a planted outlier channel / massive token where it
was planted, groups linears that read one tensor into one row, and splits LLM inputs by modality."""
import copy

import torch

from qvlm import data, models
from qvlm.analysis import outliers
from qvlm.models import llava


def _setup():
    model, processor = models.load("tiny")
    return model, processor, data.load_split("tiny", "train", limit=8)


def test_tables_cover_every_unit_and_leave_the_model_alone():
    model, processor, samples = _setup()
    before = copy.deepcopy(model.state_dict())
    pic = outliers.activation_outliers(model, processor, samples, batch_size=4)
    assert set(pic) == {"channels", "massive", "modality"}
    ch = pic["channels"]
    n_lin = len(llava.linear_layers(model))
    assert ch["unit"].str.count(r"\+").sum() + len(ch) == n_lin          # every linear in exactly one unit
    assert any(u.endswith("q_proj+k_proj+v_proj") for u in ch["unit"])  # q|k|v read one tensor
    assert set(ch["part"]) == {"vision", "projector", "llm"}
    assert (ch["ratio"] >= 1).all() and (ch["absmax"] > 0).all()
    blocks = llava.blocks(model)
    assert len(pic["massive"]) == sum(b.part != "projector" for b in blocks)
    assert len(pic["modality"]) == (ch["part"] == "llm").sum()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_planted_channel_and_token_are_found():
    model, processor, samples = _setup()
    lin = model.model.language_model.layers[1].mlp.down_proj
    h = lin.register_forward_pre_hook(lambda m, a: (a[0].index_fill(-1, torch.tensor([7]), 1e3),))
    layer = model.model.language_model.layers[0]

    def plant(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        mask = state["mask"]
        for r in range(x.shape[0]):
            t = int(torch.nonzero(mask[r])[2])
            x[r, t, 5] = 1e4
        return out
    state = {}
    orig_collate = data.collate

    def collate(chunk, processor, **kw):
        b = orig_collate(chunk, processor, **kw)
        state["mask"] = b["attention_mask"].bool()
        return b
    data.collate = collate
    h2 = layer.register_forward_hook(plant)     # a massive value at every row's 3rd valid token, channel 5
    try:
        pic = outliers.activation_outliers(model, processor, samples, batch_size=4)
    finally:
        data.collate = orig_collate
        h.remove()
        h2.remove()
    row = pic["channels"].set_index("unit").loc["llm.1.down_proj"]
    assert row["top_channel"] == 7 and row["ratio"] > 10
    m0 = pic["massive"].set_index("layer").loc["llm.0"]
    assert (m0["token_position"], m0["channel"], m0["frequency"]) == (2, 5, 1.0) and m0["max_abs"] >= 1e4
