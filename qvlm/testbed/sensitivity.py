"""Does the testbed discriminate quantizers? `python -m qvlm.testbed.sensitivity [--model DIR]`

Naive round-to-nearest (per-channel symmetric weights, per-token symmetric activations) on every linear layer of
the vision tower, projector and LLM (lm_head and embeddings FP), at W4A4 and W8A8, with and without the norm gains
folded into the reading linears first, and after the QuaRot rotation, evaluated on the full test split. The bar (qvlm.report.claims): W4A4 loses >= 10 points, W8A8 <= 1. The result is stored in `testbed.json` next to the
checkpoint (atomically), so notebook 00 and the tests read the measured numbers.
"""
from __future__ import annotations

import argparse
import json

from .. import data as qdata
from ..config import CalibConfig, EvalConfig
from ..evaluate import evaluate
from ..experiments import run_one
from ..models import load, resolve_path
from ..utils import atomic_write_json


def measure(model, processor, samples, batch_size: int = 32, seed: int = 0, dataset: str = "tiny") -> dict:
    """Accuracies of `model` on `samples` (the model itself is not modified): "fp", naive RTN "rtn_w4a4" and
    "rtn_w8a8", "rtn_w4a4_fold" / "rtn_w8a8_fold" after folding every norm gain into the reading linears (an
    exact rewrite: outliers that a fold removes were never a quantization problem), and "rtn_w4a4_rotate" /
    "rtn_w8a8_rotate" after the seeded QuaRot rotation (`--transform rotate`: residual stream + online down_proj
    Hadamard; a sanity check of the rotation, which should rescue RTN W4A4)."""
    out = {"fp": evaluate(model, processor, samples, batch_size=batch_size, progress=False)["accuracy"]}
    ev = EvalConfig(dataset=dataset, batch_size=batch_size)
    for transform, suffix in (("none", ""), ("fold", "_fold"), ("rotate", "_rotate")):
        for setting in ("W4A4", "W8A8"):
            row = run_one(model, processor, "rtn", setting, seed, calib=CalibConfig(n_calib=8), eval=ev,
                          samples=samples, transform=transform)
            out[f"rtn_{setting.lower()}{suffix}"] = row["accuracy"]
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
