"""The spine: synthetic data, prompt protocol, ScienceQA parquet loading, model loading errors, evaluation, CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qvlm import data, evaluate, models
from qvlm.data import synthetic
from qvlm.errors import QVLMError
from qvlm.models.tiny import build_random
from qvlm.paths import REPO_ROOT, TINY_DIR


def test_synthetic_is_deterministic_and_splits_disjoint():
    a, b = synthetic.generate("train", 50, seed=0), synthetic.generate("train", 50, seed=0)
    assert all(np.array_equal(x["image"], y["image"]) and x["question"] == y["question"] for x, y in zip(a, b))
    test = synthetic.generate("test", 50, seed=0)
    train_imgs = {x["image"].tobytes() for x in a}
    assert not any(t["image"].tobytes() in train_imgs for t in test)
    assert synthetic.generate("train", 50, seed=1)[0]["question"] != a[0]["question"] or \
        not np.array_equal(synthetic.generate("train", 50, seed=1)[0]["image"], a[0]["image"])


def test_synthetic_memo_hands_out_fresh_samples_of_the_same_data():
    made = synthetic._generate("val", 20, 0)                          # what generate memoises
    a = synthetic.generate("val", 20)
    a[0]["question"], a[1]["choices"][0] = "edited", "edited"           # a caller's edits stay with its copy
    b = synthetic.generate("val", 20)
    assert b[0]["question"] == made[0]["question"] != "edited" and b[1]["choices"] == made[1]["choices"]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(b, made))
    with pytest.raises(ValueError):                                    # images are shared, so they are read-only
        b[2]["image"][0, 0, 0] = 1


def test_synthetic_format_and_chance():
    s = synthetic.generate("test", 200)
    assert {x["category"] for x in s} == set(synthetic.CATEGORIES)
    for x in s:
        assert 0 <= x["answer"] < len(x["choices"]) and len(set(x["choices"])) == len(x["choices"])
        assert x["image"].shape == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE, 3) and x["image"].dtype == np.uint8
    assert evaluate.chance_accuracy(s) <= 0.35


def test_majority_floor_is_the_best_constant_answer():
    s = [dict(choices=["a", "b", "c", "d"], answer=a) for a in (1, 1, 1, 0, 2, 3)] + \
        [dict(choices=["a", "b"], answer=a) for a in (0, 1)]
    assert evaluate.majority_accuracy(s) == 4 / 8                     # always answering position 1
    assert evaluate.chance_accuracy(s) == (6 / 4 + 2 / 2) / 8
    preds = [1] * len(s)
    assert evaluate.evaluate(None, None, [dict(x, category="c") for x in s], predictions=preds)["accuracy"] \
        == evaluate.majority_accuracy(s)


def test_prompt_follows_llava_scienceqa_protocol():
    s = dict(question="what colour is the circle ?", choices=["red", "blue"], answer=1, image=np.zeros((2, 2, 3)))
    p = data.prompt(s)
    assert p.startswith("USER: <image>\n") and "\nA. red\nB. blue\n" in p
    assert p.endswith("Answer with the option's letter from the given choices directly. ASSISTANT:")


def test_calibration_uses_train_only():
    cal = data.calibration_set("tiny", 16, seed=0)
    assert all(x["split"] == "train" for x in cal) and len(cal) == 16
    assert [x["id"] for x in cal] == [x["id"] for x in data.calibration_set("tiny", 16, seed=0)]
    with pytest.raises(QVLMError, match="empty calibration set"):
        data.calibration_set("tiny", 0)


def test_unknown_split_and_missing_dataset():
    with pytest.raises(QVLMError, match="unknown split"):
        data.load_split("tiny", "dev")
    with pytest.raises(QVLMError, match="neither 'tiny' nor a directory"):
        data.load_split("/no/such/sqa", "test")


def _write_sqa_fixture(root, splits=("train", "test")):
    """A 6-row ScienceQA fixture in the Hugging Face parquet layout (image struct with PNG bytes)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
    (root / "data").mkdir(parents=True)
    for split in splits:
        rows = [dict(image={"bytes": buf.getvalue(), "path": None} if i % 2 == 0 else None,
                     question=f"q{i}", choices=["a", "b", "c"], answer=i % 3, hint="", task="closed choice",
                     grade="grade3", subject=["natural science", "social science"][i % 2], topic="t",
                     category="c", skill="s", lecture="", solution="") for i in range(6)]
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")


def test_scienceqa_parquet_layout(tmp_path):
    _write_sqa_fixture(tmp_path)
    s = data.load_split(str(tmp_path), "test")
    assert len(s) == 6 and s[0]["image"].shape == (8, 8, 3) and s[1]["image"] is None
    assert s[0]["category"] == "natural science" and s[2]["answer"] == 2
    assert "<image>" not in data.prompt(s[1])
    with pytest.raises(QVLMError, match="no val split"):
        data.load_split(str(tmp_path), "val")
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(QVLMError, match="cannot read"):
        data.load_split(str(tmp_path), "train")


def test_evaluate_random_model_on_scienceqa_fixture(tmp_path):
    _write_sqa_fixture(tmp_path)
    model, proc = build_random()
    res = evaluate.evaluate(model, proc, data.load_split(str(tmp_path), "test"), batch_size=4, progress=False)
    assert 0 <= res["accuracy"] <= 1 and res["n"] == 6 and set(res["per_category"]) == {"natural science", "social science"}


def test_evaluate_is_deterministic_and_restricted_to_letters():
    model, proc = build_random(seed=1)
    s = data.load_split("tiny", "test", limit=20)
    p1 = evaluate.predict(model, proc, s, batch_size=7, progress=False)
    p2 = evaluate.predict(model, proc, s, batch_size=20, progress=False)
    assert p1 == p2 and all(0 <= p < len(x["choices"]) for p, x in zip(p1, s))


def test_load_errors(tmp_path):
    with pytest.raises(QVLMError, match="not found"):
        models.load(str(tmp_path / "nope"))
    with pytest.raises(QVLMError, match="no config.json"):
        models.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(QVLMError, match="not LLaVA"):
        models.load(str(tmp_path))


def test_corrupt_safetensors(tmp_path):
    model, proc = build_random()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, _ = models.load(str(tmp_path))
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))
    f = next(tmp_path.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(QVLMError, match="cannot load weights"):
        models.load(str(tmp_path))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qvlm", *args], capture_output=True, text=True, cwd=REPO_ROOT)


def test_cli_bad_input_is_one_line(tmp_path):
    r = _cli("eval", "--model", str(tmp_path / "missing"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "fix:" in r.stderr


@pytest.mark.skipif(not (TINY_DIR / "config.json").exists(), reason="testbed checkpoint not built")
def test_cli_eval_testbed_json(tmp_path):
    out = tmp_path / "r.json"
    r = _cli("eval", "--model", "tiny", "--limit", "40", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert {"accuracy", "per_category", "n", "model"} <= set(res) and res["n"] == 40 and 0 <= res["accuracy"] <= 1


def _record():
    return json.loads((TINY_DIR / "testbed.json").read_text())


@pytest.mark.skipif(not (TINY_DIR / "testbed.json").exists(), reason="testbed checkpoint not built")
def test_testbed_fp_acceptance_record():
    """The shipped checkpoint's recorded FP accuracy meets the bar (>= 85 % on test, chance <= 35 %), and the
    RTN sensitivity record exists and belongs to this checkpoint (its FP number matches)."""
    rec = _record()
    assert rec["fp_test"]["accuracy"] >= 0.85 and rec["chance_test"] <= 0.35
    sens = rec.get("sensitivity")
    assert sens, "testbed.json lacks the RTN sensitivity record (python -m qvlm.testbed.sensitivity)"
    assert sens["fp"] == pytest.approx(rec["fp_test"]["accuracy"]) and sens["n"] == rec["fp_test"]["n"]
    assert sens["fp"] - sens["rtn_w8a8"] <= 0.02


@pytest.mark.skipif(not (TINY_DIR / "testbed.json").exists(), reason="testbed checkpoint not built")
def test_tiny_has_no_manufactured_outliers():
    """tiny is the fast model, not evidence: its W4A4 difficulty is mild and folding the norms changes little
    (the injected outliers it once carried were exactly undone by a fold). The real-weights model carries the
    quantization claims."""
    sens = _record()["sensitivity"]
    assert abs(sens["rtn_w4a4"] - sens["rtn_w4a4_fold"]) <= 0.02
    assert sens["fp"] - sens["rtn_w8a8"] <= 0.01
