"""Outlier channels for the testbed: `python -m qvlm.testbed.outliers [--model DIR] [--scale S] [--frac F]`.

Why. Real LLaVA (CLIP ViT-L + LLaMA) has a few input channels of its linear layers whose activations are 10-100x
larger than the rest (Dettmers et al., LLM.int8(); Xiao et al., SmoothQuant; Sun et al., "Massive Activations").
They are why naive per-token W4A4 collapses on real models while W8A8 survives, and they are what SmoothQuant,
AWQ and Q-VLM's activation-clipping search are built to handle. A 1.75 M-parameter model trained for minutes on
synthetic data does not grow them (measured: naive RTN W4A4 loses only ~3.5 points), so it would not discriminate
quantizers the way real LLaVA does.

What. An exact reparameterisation that leaves the FP function unchanged (up to fp32 roundoff): for every norm that
feeds linear layers (CLIP layer_norm1 -> q,k,v and layer_norm2 -> fc1; LLaMA input_layernorm -> q,k,v and
post_attention_layernorm -> gate,up), the `frac` share of channels with the largest |gain| get their gain (and bias)
multiplied by `scale` (chosen on the val split by `choose_scale`: the first of SWEEP whose naive W4A4 drop
clears the testbed bar with a margin), and the matching input columns of the linears that read the norm are divided by `scale`:

    W x_norm = (W diag(1/s)) (diag(s) x_norm)

It is SmoothQuant's migration run backwards, so the linears' inputs carry outlier channels like a real model's,
and whatever a quantizer does about them is measured honestly. Pairs are found by tracing one batch (which norm's
output each linear reads), not from names or widths. The checkpoint's testbed.json records scale and frac, and a
second application is refused.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .. import data as qdata
from ..errors import QVLMError
from ..models import load, resolve_path
from ..transforms.fold import norm_linear_pairs
from ..utils import atomic_dir, atomic_write_json
from .sensitivity import measure

FRAC = 1 / 64    # share of each norm's channels made outliers (at least one): LLaMA-7B has ~6-10 of 4096


@torch.no_grad()
def inject(model: nn.Module, batch: dict, scale: float, frac: float = FRAC) -> list[dict]:
    """Apply the reparameterisation in place; returns one row per norm (name, channels, linears)."""
    if not scale >= 1.0 or not 0.0 < frac <= 1.0:
        raise QVLMError(f"outlier scale {scale} / frac {frac} out of range", "use scale >= 1 and 0 < frac <= 1")
    rows = []
    for name, norm, lins in norm_linear_pairs(model, batch):
        C = norm.weight.numel()
        k = max(1, round(frac * C))
        ch = norm.weight.abs().topk(k).indices
        norm.weight[ch] *= scale
        if getattr(norm, "bias", None) is not None:
            norm.bias[ch] *= scale
        for lin in lins:
            lin.weight[:, ch] /= scale
        rows.append(dict(norm=name, channels=sorted(ch.tolist()), n_linears=len(lins)))
    if not rows:
        raise QVLMError("no norm -> linear pairs found", "the model is not a LLaVA-architecture model")
    return rows


@torch.no_grad()
def remove(model: nn.Module, batch: dict, record: dict) -> list[dict]:
    """The exact inverse of `inject` from its record (testbed.json "outliers"): the recorded channels' norm gains
    (and biases) divided by the scale, the columns of the linears that read them multiplied back (traced on
    `batch`, as inject does). Returns one row per norm undone."""
    scale, by_name = float(record["scale"]), {r["norm"]: r for r in record["norms"]}
    rows = []
    for name, norm, lins in norm_linear_pairs(model, batch):
        if name not in by_name:
            continue
        ch = torch.tensor(by_name[name]["channels"])
        norm.weight[ch] /= scale
        if getattr(norm, "bias", None) is not None:
            norm.bias[ch] /= scale
        for lin in lins:
            lin.weight[:, ch] *= scale
        rows.append(dict(norm=name, channels=by_name[name]["channels"], n_linears=len(lins)))
    if len(rows) != len(by_name):
        raise QVLMError(f"only {len(rows)} of {len(by_name)} recorded norms were found",
                        "remove the outliers from the checkpoint they were injected into")
    return rows


@torch.no_grad()
def input_absmax(model: nn.Module, batch: dict, layer: nn.Module) -> torch.Tensor:
    """(in_features,) max |x| over all tokens of `batch` of the input of `layer`: where outlier channels show."""
    seen = {}

    def grab(mod, a):                       # a pre-hook that returns a value would replace the input: return None
        seen.setdefault("x", a[0].detach())

    h = layer.register_forward_pre_hook(grab)
    try:
        model(**batch)
    finally:
        h.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1]).abs().amax(0)


SWEEP = (4.0, 8.0, 12.0, 16.0, 32.0)   # candidate scales, tried in order on the VAL split
W4A4_DROP = 0.12                      # pick the first scale whose naive W4A4 val drop >= the 10-point bar + 2
W8A8_DROP = 0.01                      # ... while naive W8A8 stays within 1 point (the bar is 2)


def choose_scale(model: nn.Module, processor, batch: dict, samples: list[dict], scales=SWEEP, frac: float = FRAC):
    """Try each scale on a copy (naive RTN W4A4 / W8A8 on `samples`, which must not be test); returns (scale, rows)
    for the first that meets W4A4_DROP and W8A8_DROP (the last one tried if none does)."""
    rows = []
    for scale in scales:
        m = copy.deepcopy(model)
        inject(m, batch, scale, frac)
        r = measure(m, processor, samples)
        rows.append(dict(scale=scale, **r))
        if r["fp"] - r["rtn_w4a4"] >= W4A4_DROP and r["fp"] - r["rtn_w8a8"] <= W8A8_DROP:
            break
    return rows[-1]["scale"], rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", default="", help="output checkpoint directory (default: replace --model)")
    ap.add_argument("--scale", type=float, default=0.0,
                    help="outlier gain multiplier; 0: choose it on the val split (choose_scale over SWEEP)")
    ap.add_argument("--frac", type=float, default=FRAC)
    args = ap.parse_args(argv)
    src = resolve_path(args.model)
    rec = json.loads((src / "testbed.json").read_text()) if (src / "testbed.json").exists() else {}
    if rec.get("outliers"):
        raise QVLMError(f"{src} already has outlier channels ({rec['outliers']['scale']}x)",
                        "apply to a checkpoint fresh from `python -m qvlm.testbed.train`")
    model, processor = load(str(src))
    batch = qdata.collate(qdata.load_split("tiny", "train", limit=4), processor)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    sweep = []
    scale = args.scale
    if not scale:
        scale, sweep = choose_scale(model, processor, batch, qdata.load_split("tiny", "val"), frac=args.frac)
        for r in sweep:
            print(f"  scale {r['scale']:>5}: val fp {r['fp']:.3f}  rtn W4A4 {r['rtn_w4a4']:.3f}  W8A8 {r['rtn_w8a8']:.3f}")
    rows = inject(model, batch, scale, args.frac)
    rec["outliers"] = dict(scale=scale, frac=args.frac, norms=rows, val_sweep=sweep,
                           rule=dict(w4a4_drop_at_least=W4A4_DROP, w8a8_drop_at_most=W8A8_DROP, grid=list(SWEEP)))
    rec.pop("sensitivity", None)          # measured on the old weights: rerun `python -m qvlm.testbed.sensitivity`
    with atomic_dir(args.out or src) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "testbed.json", rec)
    print(f"outlier channels ({scale}x, {len(rows)} norms) -> {args.out or src}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QVLMError as e:
        print(f"qvlm: error: {e}", file=sys.stderr)
        sys.exit(2)
