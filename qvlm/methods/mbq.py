"""`mbq`: MBQ -- Modality-Balanced Quantization (Li et al., CVPR 2025): AWQ's scale search with the reconstruction
error of each LLM layer weighted per modality by the loss's sensitivity to that modality's tokens.

A VLM's language model sees image tokens and text tokens whose errors matter unequally: MBQ measures, on the
calibration set, the gradient of the SFT loss (here: cross-entropy of the answer token) with respect to each LLM
layer's output, and averages its magnitude separately over image and text tokens,

    g_img(l) = mean_{t in image} ||dL/dO_t(l)||_1 / C,      g_txt(l) = mean_{t in text} ||dL/dO_t(l)||_1 / C

(MBQ §3.2, the "modality-balanced" objective). The scale search of layer l then minimises

    g_img(l) * sum_{t in image} ||dO_t||^2 + g_txt(l) * sum_{t in text} ||dO_t||^2

instead of AWQ's unweighted sum; the weights are normalised so that text tokens weigh 1 (only the ratio matters to
the argmin; it is recorded per layer). Vision-tower and projector units see image tokens only, so their objective
is AWQ's. Everything else (the scale grid over r, the fold of 1/s, the weight clip search) is `qvlm.methods.awq`
unchanged; the knobs are AWQ's (MBQConfig adds none that AWQ has). With activations quantized (W4A8 / W4A4 in the
paper's tables) the search sees the activation quantization too, as AWQ here does.

Paper defaults and what differs here: MBQ calibrates on COCO captions with the caption SFT loss; the calibration
answers of the synthetic ScienceQA-format train split play that role (labels of the calibration split only, never
val / test). The gradients come from the FP model once, before any layer is quantized, as in the reference.

Reference: thu-nics/MBQ (`qmllm/methods/mbq/quantizer.py`: gradient-weighted `auto_scale` loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..core.calib import calibrate
from ..core.hooks import calib_batches, image_token_id, model_inputs
from ..models import llava
from . import awq
from .base import Method


@dataclass(frozen=True)
class MBQConfig(awq.AWQConfig):
    grad_batch_size: int = 4            # calibration samples per backward pass of the sensitivity measurement


def modality_sensitivity(model, processor, samples, batch_size: int, progress: bool = True) -> dict[int, dict]:
    """{LLM layer index: dict(image=g_img, text=g_txt, n_image, n_text)}: the mean absolute gradient of the answer
    cross-entropy w.r.t. each LLM layer's output, per modality (module docstring). The model is left unchanged."""
    layers = llava.parts(model)["llm"].blocks
    img_id = image_token_id(model)
    acc = {i: dict(image=0.0, text=0.0, n_image=0, n_text=0) for i in range(len(layers))}
    masks = {}

    def on_output(i):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            if h.requires_grad:
                h.register_hook(lambda g, i=i: _accumulate(acc[i], g, masks))
        return hook

    handles = [blk.register_forward_hook(on_output(i)) for i, blk in enumerate(layers)]
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        for batch in tqdm(calib_batches(samples, processor, batch_size, with_answer=True), desc="mbq gradients",
                          disable=not progress, leave=False):
            inputs = model_inputs(model, batch)
            ids = inputs["input_ids"]
            masks["image"] = ids == img_id
            masks["text"] = inputs.get("attention_mask", torch.ones_like(ids)).bool() & ~masks["image"]
            emb = model.get_input_embeddings()
            with torch.enable_grad():
                h = emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
                try:
                    logits = model(**inputs).logits
                finally:
                    h.remove()
                labels = batch["labels"].to(logits.device)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                         labels[:, 1:].flatten(), ignore_index=-100)
                loss.backward()
    finally:
        for hd in handles:
            hd.remove()
        for p in model.parameters():
            p.requires_grad_(grad_flags[id(p)])
    return {i: dict(image=a["image"] / max(a["n_image"], 1), text=a["text"] / max(a["n_text"], 1),
                    n_image=a["n_image"], n_text=a["n_text"]) for i, a in acc.items()}


def _accumulate(a: dict, grad: torch.Tensor, masks: dict) -> None:
    g = grad.detach().float().abs().mean(-1)                                   # (B, T): mean |dL/dO| over channels
    for kind in ("image", "text"):
        m = masks[kind].to(g.device)
        a[kind] += float(g[m].sum())
        a[f"n_{kind}"] += int(m.sum())


def token_weights(data, ratio: float) -> list[torch.Tensor] | None:
    """Per-batch (B, T) weights: `ratio` (= g_img / g_txt) on image tokens, 1 on text tokens (LLM units)."""
    if not data.image_masks:
        return None
    return [torch.where(m.bool(), torch.tensor(float(ratio)), torch.tensor(1.0)) for m in data.image_masks]


def run(model, processor, samples, qcfg, calib_cfg, cfg: MBQConfig, progress: bool = True, dataset: str = "tiny") -> dict:
    """`Method.run` hook: measure the modality sensitivities on the FP model, then AWQ unit by unit with the
    modality-weighted scale objective. Returns the per-unit stats plus the per-layer weights."""
    sens = modality_sensitivity(model, processor, samples, cfg.grad_batch_size, progress)
    ratios = {i: (s["image"] / s["text"] if s["text"] > 0 and s["n_image"] else 1.0) for i, s in sens.items()}

    def unit_fn(data):
        b = data.blocks[0]
        w = token_weights(data, ratios[b.index]) if b.part == "llm" else None
        out = awq.quantize_unit(data, qcfg, cfg, w)
        if b.part == "llm":
            out["image_weight"] = ratios[b.index]
        return out

    stats = calibrate(model, processor, samples, qcfg, unit_fn, batch_size=calib_cfg.batch_size, progress=progress)
    stats["sensitivity"] = {str(i): s for i, s in sens.items()}
    return stats


def row_fields(stats: dict) -> dict:
    """The mean image/text weight ratio over LLM layers (how unbalanced the modalities were)."""
    r = [u["image_weight"] for u in stats.values() if isinstance(u, dict) and "image_weight" in u]
    return dict(mbq_image_weight=sum(r) / len(r) if r else None)


METHOD = Method("mbq", MBQConfig, None, needs_data=True, run=run, row_fields=row_fields,
                summary="MBQ: AWQ scale search with the error of image vs text tokens weighted by the loss gradient")
