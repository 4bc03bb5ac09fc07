"""The outlier picture that motivates activation quantization methods: per-channel statistics of every quantized
linear's input, the massive-activation tokens of the LLM, and image vs text token ranges. Read-only.

    pic = activation_outliers(model, processor, samples)
    pic["channels"]   one row per distinct linear input (unit): absmax, median channel absmax, their ratio (how
                      far the largest channel sticks out), the top channel, kurtosis of the values
    pic["massive"]    one row per LLM layer: the largest |x| of the residual stream entering it, at which token
                      (position among the valid tokens; kind image / text / first) and channel, and its ratio to the
                      median |x| (Sun et al. 2024, "Massive activations in large language models")
    pic["modality"]   one row per LLM unit input: absmax over image tokens and over text tokens
    channel_profile(...) the per-channel absmax vector of one linear's input (for a plot)

Per-token activation quantization suffers when a few channels carry most of the range (every token's step is set
by them); folding norms and smoothing move such channels into the weights, rotations spread them out.
"""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from .. import data as qdata
from ..core.hooks import InputTap, image_token_id, model_inputs, token_masks
from ..core.units import find_units
from ..models import llava


@torch.no_grad()
def activation_outliers(model: nn.Module, processor, samples: list[dict], batch_size: int = 16) -> dict:
    """The three tables of the module docstring over `samples` (any split: nothing is fitted)."""
    units = find_units(model, processor, samples[0])
    infos = {i.key: i for i in llava.linear_layers(model)}
    firsts = {u.keys[0]: u for u in units}
    img_id = image_token_id(model)
    stats: dict[str, dict] = {}
    state: dict = {}

    def on_input(key, x):
        u = firsts[key]
        valid, image = token_masks(state["batch"], x, img_id, u.part)
        rows = x[valid].float()                                                 # (N, C) valid tokens
        st = stats.setdefault(key, dict(absmax=torch.zeros(x.shape[-1]), n=0, s1=0.0, s2=0.0, s4=0.0,
                                        img=0.0, txt=0.0))
        st["absmax"] = torch.maximum(st["absmax"], rows.abs().amax(0).cpu())
        st["n"] += rows.numel()
        st["s1"] += float(rows.sum())
        st["s2"] += float(rows.pow(2).sum())
        st["s4"] += float(rows.pow(4).sum())
        if u.part == "llm":
            st["img"] = max(st["img"], float(x[valid & image].abs().max()) if (valid & image).any() else 0.0)
            st["txt"] = max(st["txt"], float(x[valid & ~image].abs().max()) if (valid & ~image).any() else 0.0)

    blocks = {b.key: b.module for b in llava.blocks(model, ("llm",))}
    top: dict[str, tuple] = {}

    def on_residual(key, x):                      # the decoder layer's input: the raw residual stream
        valid, image = token_masks(state["batch"], x, img_id, "llm")
        a = x.abs().float().masked_fill(~valid[..., None], 0)                       # (B, T, C)
        v, flat = a.reshape(-1).max(0)
        b, t, c = (int(i) for i in torch.unravel_index(flat, a.shape))
        if key not in top or float(v) > top[key][0]:
            kind = "image" if bool(image[b, t]) else ("first" if int(valid[b, :t].sum()) == 0 else "text")
            top[key] = (float(v), int(valid[b, :t].sum()), kind, c, float(a[valid].median()))

    with InputTap({k: infos[k].module for k in firsts}, on_input), InputTap(blocks, on_residual):
        for chunk in qdata.batches(samples, batch_size):
            batch = state["batch"] = qdata.collate(chunk, processor)
            model(**model_inputs(model, batch))
    channels, massive, modality = [], [], []
    for key, u in firsts.items():
        st = stats[key]
        mean, m2 = st["s1"] / st["n"], st["s2"] / st["n"]
        var = max(m2 - mean ** 2, 1e-12)
        kurt = (st["s4"] / st["n"]) / var ** 2                                   # about (zero-mean inputs)
        am = st["absmax"]
        channels.append(dict(unit=u.name, part=u.part, layer=u.layer, absmax=float(am.max()),
                             median_channel_absmax=float(am.median()), ratio=float(am.max() / am.median().clamp_min(1e-12)),
                             top_channel=int(am.argmax()), kurtosis=kurt, width=u.width))
        if u.part == "llm":
            modality.append(dict(unit=u.name, layer=u.layer, image_absmax=st["img"], text_absmax=st["txt"]))
    for layer, (v, pos, kind, c, med) in top.items():
        massive.append(dict(layer=layer, max_abs=v, token_position=pos, token_kind=kind, channel=c,
                            ratio_to_median=v / max(med, 1e-12)))
    return dict(channels=pd.DataFrame(channels), massive=pd.DataFrame(massive), modality=pd.DataFrame(modality))


@torch.no_grad()
def channel_profile(model: nn.Module, processor, samples: list[dict], layer: nn.Module) -> torch.Tensor:
    """(in_features,) max |x| over every token of `samples` of the input of `layer`."""
    seen = []
    with InputTap({"x": layer}, lambda k, x: seen.append(x.detach().reshape(-1, x.shape[-1]).abs().amax(0))):
        for chunk in qdata.batches(samples, 16):
            model(**model_inputs(model, qdata.collate(chunk, processor)))
    return torch.stack(seen).amax(0).cpu()
