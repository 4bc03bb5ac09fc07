"""qvlm.method.rounding + qvlm.method.pipeline: driver units, the block search against RTN, the full pipeline
(registration, determinism, R10 save -> load -> apply), config validation and the generated CLI flags."""
import copy

import pytest
import torch

from qvlm import cli, data, evaluate, methods
from qvlm.core import units as U
from qvlm.analysis import entropy as E
from qvlm.core import hooks as H
from qvlm.method import rounding as R
from qvlm.config import CalibConfig, QuantConfig
from qvlm.errors import QVLMError
from qvlm.method import pipeline as Q
from qvlm.models import tiny

torch.set_num_threads(1)
ARCH = dict(vision_layers=2, text_layers=2)                     # small random testbed: same classes, fewer layers
QCFG = QuantConfig(w_bits=3, a_bits=8)
KNOBS = dict(iters=10, veo_iters=2)


def logits(model, processor, samples):
    b = data.collate(samples, processor)
    with torch.no_grad():
        return model(**H.model_inputs(model, b)).logits


def test_driver_units_close_over_straddling_blocks():
    layers = ["llm.0", "llm.1", "llm.2", "llm.3"]
    blocks = [["llm.0.a", "llm.0.b"], ["llm.0.c", "llm.1.a"], ["llm.1.b"], ["llm.2.a"], ["llm.2.b", "llm.3.a"]]
    assert R.driver_units(blocks, layers) == [["llm.0", "llm.1"], ["llm.2", "llm.3"]]
    assert R.driver_units([["llm.0.a"], ["llm.1.a"]], ["llm.0", "llm.1"]) == [["llm.0"], ["llm.1"]]
    assert U.layer_of("vision.12.mlp.fc1") == "vision.12"


def test_config_validation():
    with pytest.raises(QVLMError):
        Q.QVLMConfig(p=2.0)
    with pytest.raises(QVLMError):
        Q.QVLMConfig(veo_stage="never")
    with pytest.raises(QVLMError):
        Q.QVLMConfig(encoder_params="lora")
    cfg = Q.QVLMConfig(iters=7, max_depth=2)
    assert cfg.recon_config().iters == 7 and cfg.recon_config().learn_act
    assert cfg.partition_config().max_depth == 2


def test_cli_flags_generated_from_the_dataclass():
    parser = cli.build_parser(["quantize", "--method", "qvlm"])
    args = parser.parse_args(["quantize", "--method", "qvlm", "--out", "x", "--p", "0.7", "--max-depth", "2",
                              "--veo", "false", "--encoder-params", "all", "--iters", "3"])
    assert cli.knobs_from_args(args) == dict(p=0.7, max_depth=2, veo=False, encoder_params="all", iters=3)
    Q.QVLMConfig(**cli.knobs_from_args(args))
    with pytest.raises(SystemExit):                               # a misspelt knob is rejected, not ignored
        parser.parse_args(["quantize", "--method", "qvlm", "--out", "x", "--max-dpeth", "2"])
    rtn = cli.build_parser(["quantize", "--method", "rtn"])
    with pytest.raises(SystemExit):                               # rtn has no knobs: --iters is not one of its flags
        rtn.parse_args(["quantize", "--method", "rtn", "--out", "x", "--iters", "3"])


@pytest.fixture(scope="module")
def calib():
    return data.calibration_set("tiny", 4, seed=0)


@pytest.fixture(scope="module")
def pipeline(calib):
    """Q-VLM through the registry (as `qvlm quantize --method qvlm` runs it), twice with the same seed."""
    assert "qvlm" in methods.METHODS
    runs = []
    for _ in range(2):
        model, processor = tiny.build_random(0, **ARCH)
        fp = copy.deepcopy(model)
        _, info = methods.quantize(model, processor, "qvlm", QCFG, CalibConfig(n_calib=4, batch_size=4, seed=0),
                                   progress=False, **KNOBS)
        runs.append((model, fp, processor, info))
    return runs


def test_block_search_lowers_block_error_vs_rtn(pipeline):
    info = pipeline[0][3]
    stats = info["blocks"]
    assert stats["loss"] < stats["loss_rtn"]                     # summed over blocks: strictly better than RTN
    assert stats["n_blocks"] >= 2 and stats["max_depth"] <= Q.QVLMConfig().max_depth
    # the entropy partition produced a block that straddles two transformer layers, and the driver coped
    assert any(len({u.split(".")[1] for u in blk}) > 1 for blk in stats["partition"])
    assert stats["veo"]["loss_after"] < stats["veo"]["loss_before"]


def test_output_error_against_fp(pipeline, calib):
    model, fp, processor, _ = pipeline[0]
    assert evaluate.output_error(fp, fp, processor, calib)["kl"] == pytest.approx(0.0, abs=1e-9)
    err = evaluate.output_error(model, fp, processor, calib)
    assert err["kl"] > 0 and err["mse"] > 0 and err["n"] == len(calib)


def test_pipeline_is_deterministic(pipeline, calib):
    (m1, _, proc, i1), (m2, _, _, i2) = pipeline
    assert i1["blocks"]["partition"] == i2["blocks"]["partition"]
    assert torch.equal(logits(m1, proc, calib), logits(m2, proc, calib))


def test_save_load_apply_reproduces_the_search(calib, tmp_path):
    model, processor = tiny.build_random(0, **ARCH)
    fresh = copy.deepcopy(model)
    cfg = Q.QVLMConfig(**KNOBS)
    res = Q.run_qvlm(model, processor, calib, QCFG, cfg, batch_size=4, seed=0)
    path = Q.save_qvlm(res, tmp_path / Q.artifact_name("tiny", QCFG, len(calib), 0))
    back = Q.load_qvlm(path)
    assert back.config["p"] == cfg.p and back.config["quant"]["w_bits"] == 3
    Q.apply_qvlm(fresh, back)
    assert torch.equal(logits(model, processor, calib), logits(fresh, processor, calib))
    for blk in back.decisions["blocks"]:
        assert blk["loss"] <= blk["loss_rtn"] + 1e-9             # never worse than RTN, block by block


def test_rejects_nf4_and_test_split(calib):
    model, processor = tiny.build_random(0, **ARCH)
    with pytest.raises(QVLMError):
        Q.run_qvlm(model, processor, calib, QuantConfig(weight_format="nf4"), Q.QVLMConfig(**KNOBS))
    with pytest.raises(QVLMError):
        Q.run_qvlm(model, processor, data.load_split("tiny", "test", limit=2), QCFG, Q.QVLMConfig(**KNOBS))
