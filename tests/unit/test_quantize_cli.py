"""`qvlm quantize`: end to end on a small random checkpoint, reload with `qvlm eval`, and every bad input exits
non-zero with one line on stderr and no output directory."""
import json
import os
import subprocess
import sys

import pytest
import torch

from qvlm import cli
from qvlm.models import tiny
from qvlm.paths import REPO_ROOT
from qvlm.core.checkpoint import QUANT_META

torch.set_num_threads(1)
SMALL = dict(vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
             text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=64)
FAST = ["--calib", "4", "--calib-batch-size", "2", "--limit", "8", "--batch-size", "8"]


def _save(path, poison=False):
    model, processor = tiny.build_random(0, **SMALL)
    if poison:                                   # finite weights whose activations overflow in decoder layer 1
        model.model.language_model.layers[1].input_layernorm.weight.data.fill_(1e30)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("ckpt") / "small")


def _error_line(err: str) -> str:
    """The one error line (progress bars of model loading / calibration may precede it on stderr)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("qvlm: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_quantize_then_eval_reloads_the_same_model(base, tmp_path, capsys):
    out, js = tmp_path / "q", tmp_path / "r.json"
    rc, stdout, _ = _run(capsys, "quantize", "--model", base, "--method", "smoothquant", "--w-bits", "8",
                         "--a-bits", "8", "--group-size", "16", "--out", str(out), "--json", str(js), *FAST)
    assert rc == 0 and (out / QUANT_META).is_file()
    res = json.loads(js.read_text())
    for key in ("accuracy", "per_category", "method", "w_bits", "a_bits", "search_seconds", "peak_memory_bytes"):
        assert key in res
    assert res["method"] == "smoothquant" and res["w_bits"] == 8 and res["group_size"] == 16
    js2 = tmp_path / "e.json"
    rc, _, _ = _run(capsys, "eval", "--model", str(out), "--limit", "8", "--batch-size", "8", "--json", str(js2))
    assert rc == 0
    assert json.loads(js2.read_text())["accuracy"] == res["accuracy"]


def test_fp_method_round_trips(base, tmp_path, capsys):
    out = tmp_path / "q"
    rc, _, err = _run(capsys, "quantize", "--model", base, "--method", "fp", "--out", str(out), *FAST)
    assert rc == 0, err
    meta = json.loads((out / QUANT_META).read_text())
    assert meta["linears"] == {} and meta["quant_config"]["w_bits"] == 16
    rc, _, err = _run(capsys, "eval", "--model", str(out), "--limit", "8")
    assert rc == 0, err


def test_learned_method_with_iters_and_scope(base, tmp_path, capsys):
    out = tmp_path / "q"
    rc, stdout, err = _run(capsys, "quantize", "--model", base, "--method", "brecq", "--w-bits", "4", "--a-bits", "8",
                           "--a-granularity", "tensor", "--scope", "llm", "--iters", "3", "--out", str(out), *FAST)
    assert rc == 0, err
    meta = json.loads((out / QUANT_META).read_text())
    assert meta["method"]["knobs"]["iters"] == 3 and meta["quant_config"]["scope"] == ["llm"]
    assert all(".language_model." in name for name in meta["linears"])


@pytest.mark.parametrize("argv", [["--w-bits", "0"], ["--w-bits", "1"], ["--a-bits", "17"], ["--group-size", "7"],
                                  ["--calib", "0"], ["--method", "nope"], ["--iters", "-1", "--method", "brecq"],
                                  ["--scope", "vision,decoder"]])
def test_bad_inputs_fail_cleanly(base, tmp_path, capsys, argv):
    out = tmp_path / "q"
    rc, _, err = _run(capsys, "quantize", "--model", base, "--out", str(out), *FAST, *argv)
    assert rc == 2 and _error_line(err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]


def test_non_integer_bits_is_an_argparse_error(base, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--model", base, "--w-bits", "four", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_nan_activations_fail_cleanly(tmp_path, capsys):
    bad = _save(tmp_path / "bad", poison=True)
    out = tmp_path / "q"
    rc, _, err = _run(capsys, "quantize", "--model", bad, "--method", "gptq", "--w-bits", "4", "--a-bits", "8",
                      "--out", str(out), *FAST)
    assert rc == 2 and "llm.1" in _error_line(err)
    assert not out.exists()


def test_refuses_to_replace_an_unrelated_directory(base, tmp_path, capsys):
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    rc, _, err = _run(capsys, "quantize", "--model", base, "--out", str(tmp_path), *FAST)
    assert rc == 2 and keep.read_text() == "x"


def test_real_entry_point_exit_status(base, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "qvlm", "quantize", "--model", base, "--w-bits", "17",
                        "--out", str(tmp_path / "q")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "w_bits=17" in _error_line(p.stderr)
    assert not (tmp_path / "q").exists()
