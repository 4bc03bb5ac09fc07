"""Does the testbed discriminate quantizers? `python -m qvlm.testbed.sensitivity [--model DIR]`

Naive round-to-nearest (per-channel symmetric weights, per-token symmetric activations) on every linear layer of
the vision tower, projector and LLM (lm_head and embeddings FP), at W4A4 and W8A8, evaluated on the full test
split. The issue's bar: W4A4 loses >= 10 points, W8A8 <= 2. The result is stored in `testbed.json` next to the
checkpoint (atomically), so notebook 00 and the tests read the measured numbers.
"""
from __future__ import annotations

import argparse
import copy
import json

from .. import data as qdata
from ..config import CalibConfig, QuantConfig
from ..evaluate import evaluate
from ..models import load, resolve_path
from ..utils import atomic_write_json


def measure(model, processor, samples, cfg=None, seed: int = 0) -> dict:
    """{"fp", "rtn_w4a4", "rtn_w8a8"} accuracies of `model` on `samples` (the model itself is not modified)."""
    from ..quantize_cmd import quantize

    bs = getattr(cfg, "batch_size", 32) or 32
    out = {"fp": evaluate(model, processor, samples, batch_size=bs, progress=False)["accuracy"]}
    for w, a in ((4, 4), (8, 8)):
        qmodel, _ = quantize(copy.deepcopy(model), processor, "rtn", QuantConfig(w_bits=w, a_bits=a),
                             CalibConfig(n_calib=8, seed=seed))
        out[f"rtn_w{w}a{a}"] = evaluate(qmodel, processor, samples, batch_size=bs, progress=False)["accuracy"]
    out["n"] = len(samples)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args(argv)
    model, processor = load(args.model)
    res = measure(model, processor, qdata.load_split("tiny", "test"))
    path = resolve_path(args.model) / "testbed.json"
    rec = json.loads(path.read_text()) if path.exists() else {}
    rec["sensitivity"] = res
    atomic_write_json(path, rec)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
