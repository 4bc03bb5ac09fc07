"""The activation-outlier picture of a LLaVA model: what per-token activation quantization has to cope with.
Read-only forward hooks (the token masks and batch plumbing of qvlm.core.hooks), nothing fitted, so any split may
be used.

    pic = activation_outliers(model, processor, samples)        a dict of three DataFrames:
    pic["channels"]   one row per distinct linear INPUT (unit; q|k|v and gate|up read one tensor: one row named
                      'llm.3.q_proj+k_proj+v_proj'), vision tower, projector and LLM: absmax, the median channel's
                      absmax, their ratio (how far the top channel sticks out: every token's 4-bit step is set by
                      its largest value), the top channels, kurtosis (3 = Gaussian), token_ratio (largest token
                      absmax / median token absmax: outlier TOKENS rather than channels)
    pic["massive"]    one row per transformer layer OUTPUT (the residual stream; vision and LLM): the largest |x|,
                      its ratio to the median |x|, and where it sits -- the most frequent (token position, channel)
                      of each sample's largest entry and how often: position among the row's valid tokens (vision:
                      0 = CLS), token kind (image / text / cls / patch) and text (Sun et al. 2024, "Massive
                      activations in large language models")
    pic["modality"]   one row per LLM unit input: absmax and median channel absmax over image tokens and over text
                      tokens (the image tokens come from the projector, not the embedding table)
    channel_profile(model, processor, samples, linear) -> (in_features,) per-channel absmax of one linear's input

Token masks: an LLM input (B, T, C) is aligned with `input_ids` (valid = attention_mask, image = the image token);
vision-tower inputs are (n_images, 1 + n_patches, C) with the CLS token first; projector inputs are image tokens.
"""
from __future__ import annotations

from collections import Counter

import pandas as pd
import torch
from torch import nn

from .. import data as qdata
from ..core.hadamard import rotate_input
from ..core.hooks import image_token_id, model_inputs, token_masks
from ..core.units import unit_name
from ..models import llava


class _Stat:
    """Running statistics of one linear input: per-channel absmax (all / image / text tokens), the first four
    moments of its values, each token's absmax."""

    def __init__(self, width: int):
        self.absmax, self.img, self.txt = torch.zeros(width), torch.zeros(width), torch.zeros(width)
        self.n, self.s = 0, [0.0, 0.0, 0.0, 0.0]
        self.tok: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor, image: torch.Tensor | None) -> None:
        rows = rows.double()
        a = rows.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(0).float().cpu())
        if image is not None:
            if image.any():
                self.img = torch.maximum(self.img, a[image].amax(0).float().cpu())
            if (~image).any():
                self.txt = torch.maximum(self.txt, a[~image].amax(0).float().cpu())
        self.n += rows.numel()
        for p in range(4):
            self.s[p] += float(rows.pow(p + 1).sum())
        self.tok.append(a.amax(1).float().cpu())

    def kurtosis(self) -> float:
        mu, m2, m3, m4 = (v / self.n for v in self.s)
        var = max(m2 - mu ** 2, 1e-30)
        return (m4 - 4 * mu * m3 + 6 * mu ** 2 * m2 - 3 * mu ** 4) / var ** 2


@torch.no_grad()
def activation_outliers(model: nn.Module, processor, samples: list[dict], batch_size: int = 16,
                        scope=("vision", "projector", "llm")) -> dict[str, pd.DataFrame]:
    """{"channels", "massive", "modality"} over `samples` (module docstring)."""
    infos = llava.linear_layers(model, scope)
    by_key = {i.key: i for i in infos}
    img_id = image_token_id(model)
    groups: dict[str, list[str]] = {}            # first linear key -> keys of every linear reading that tensor
    member: dict[str, str] = {}                  # linear key -> its group's first key
    stats: dict[str, _Stat] = {}
    state: dict = {}

    def pre_hook(info):
        def pre(mod, args):
            x = args[0]
            seen = state["seen"]
            if id(x) in seen:                                       # the tensor an earlier linear read: same unit
                first = seen[id(x)][0]
                if info.key not in member:
                    member[info.key] = first
                    groups[first].append(info.key)
                return None
            first = member.setdefault(info.key, info.key)
            seen[id(x)] = (first, x)                                # x kept alive: ids stay unique in a forward
            groups.setdefault(first, [first])
            valid, image = token_masks(state["batch"], x, img_id, info.part)
            x = rotate_input(x, getattr(mod, "input_transform", None))         # what the weight multiplies
            stats.setdefault(first, _Stat(x.shape[-1])).add(x[valid], image[valid] if info.part == "llm" else None)
            return None
        return pre

    handles = [i.module.register_forward_pre_hook(pre_hook(i)) for i in infos]
    handles += _massive_hooks(model, processor, state, img_id, [p for p in scope if p != "projector"])
    try:
        for chunk in qdata.batches(samples, batch_size):
            state["batch"], state["seen"] = qdata.collate(chunk, processor), {}
            model(**model_inputs(model, state["batch"]))
    finally:
        for h in handles:
            h.remove()
    channels, modality = [], []
    for first, keys in groups.items():
        st, info = stats[first], by_key[first]
        med = float(st.absmax.median())
        tok = torch.cat(st.tok)
        top = torch.topk(st.absmax, min(3, len(st.absmax)))
        name = unit_name(keys)
        channels.append(dict(unit=name, part=info.part, layer=f"{info.part}.{info.block}", width=len(st.absmax),
                             n_tokens=len(tok), absmax=float(st.absmax.max()), median_channel_absmax=med,
                             ratio=float(st.absmax.max()) / max(med, 1e-12), top_channel=int(top.indices[0]),
                             top_channels=[int(i) for i in top.indices],
                             top_channel_absmax=[round(float(v), 4) for v in top.values], kurtosis=st.kurtosis(),
                             token_ratio=float(tok.max()) / max(float(tok.median()), 1e-12)))
        if info.part == "llm":
            modality.append(dict(unit=name, layer=f"llm.{info.block}", image_absmax=float(st.img.max()),
                                 text_absmax=float(st.txt.max()),
                                 image_median_channel_absmax=float(st.img.median()),
                                 text_median_channel_absmax=float(st.txt.median())))
    return dict(channels=pd.DataFrame(channels), massive=_massive_table(state.get("massive", {})),
                modality=pd.DataFrame(modality))


def _massive_hooks(model, processor, state: dict, img_id: int, scope) -> list:
    """Forward hooks on every transformer layer of `scope` recording each sample's largest |x| and where it is."""
    tok = processor.tokenizer
    found = state.setdefault("massive", {})

    def post_hook(blk):
        def post(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            batch = state["batch"]
            valid, image = token_masks(batch, x, img_id, blk.part)
            a = x.detach().abs().float().masked_fill(~valid[..., None], 0)             # (B, T, C)
            rec = found.setdefault(blk.key, dict(part=blk.part, where=Counter(), maxes=[], medians=[], what={}))
            v, idx = a.reshape(a.shape[0], -1).max(1)
            for r in range(a.shape[0]):
                t, c = divmod(int(idx[r]), a.shape[-1])
                pos = int(valid[r, :t].sum())                                       # among the row's valid tokens
                if blk.part == "llm":
                    what = ("image" if bool(image[r, t]) else "text",
                            tok.convert_ids_to_tokens(int(batch["input_ids"][r, t])))
                else:
                    what = ("cls" if t == 0 else "patch", "")
                rec["where"][(pos, c)] += 1
                rec["what"][(pos, c)] = what
                rec["maxes"].append(float(v[r]))
                rec["medians"].append(float(a[r][valid[r]].median()))
            return None
        return post

    return [b.module.register_forward_hook(post_hook(b)) for b in llava.blocks(model, tuple(scope))]


def _massive_table(found: dict) -> pd.DataFrame:
    rows = []
    for key, rec in found.items():
        (pos, c), count = rec["where"].most_common(1)[0]
        med = float(torch.tensor(rec["medians"]).median())
        kind, text = rec["what"][(pos, c)]
        rows.append(dict(layer=key, part=rec["part"], max_abs=max(rec["maxes"]), median_abs=med,
                         ratio_to_median=max(rec["maxes"]) / max(med, 1e-12), token_position=pos, token_kind=kind,
                         token=text, channel=c, frequency=count / len(rec["maxes"])))
    return pd.DataFrame(rows)


@torch.no_grad()
def channel_profile(model: nn.Module, processor, samples: list[dict], layer: nn.Module,
                    batch_size: int = 16) -> torch.Tensor:
    """(in_features,) max |x| over every token of `samples` (padding included) of the input of `layer`."""
    seen = []
    h = layer.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).abs().amax(0).float().cpu()))
    try:
        for chunk in qdata.batches(samples, batch_size):
            model(**model_inputs(model, qdata.collate(chunk, processor)))
    finally:
        h.remove()
    return torch.stack(seen).amax(0)
