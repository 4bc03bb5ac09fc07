"""Evaluation: multiple-choice accuracy, overall and per category, following LLaVA's ScienceQA protocol.

Deterministic scoring: one forward pass per batch; the prediction is the argmax, over the sample's choice
letters only (A, B, ... up to its number of choices), of the next-token logits after "ASSISTANT:". This is
greedy decoding restricted to valid answers (LLaVA's eval decodes freely and parses "ANSWER: X"; restricting to
the letters removes parse failures and sampling noise, so the same model always gives the same number).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as qdata
from .errors import QVLMError


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def answer_logits(model, processor, batch: dict, inputs: dict) -> torch.Tensor:
    """Next-token logits (B, V) at each row's answer position. With left padding every row ends at the last
    position, so only that position's logits are computed (`logits_to_keep=1`: the vocabulary projection is a large
    share of a small LLM's cost)."""
    if processor.tokenizer.padding_side == "left":
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     pixel_values=inputs.get("pixel_values"), logits_to_keep=1).logits[:, -1]
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   pixel_values=inputs.get("pixel_values")).logits                  # (B, T, V)
    return logits[torch.arange(len(logits), device=logits.device), batch["last"].to(logits.device)]


@torch.no_grad()
def predict(model, processor, samples: list[dict], batch_size: int = 32, progress: bool = True) -> list[int]:
    """Predicted choice index per sample (same order as `samples`)."""
    if not samples:
        raise QVLMError("nothing to evaluate (0 samples)", "check the split name and --limit")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_choices = max(len(s["choices"]) for s in samples)
    letter_ids = torch.tensor(qdata.letter_token_ids(processor.tokenizer, max_choices), device=device)
    pred = {}
    bar = tqdm(total=len(samples), desc="eval", disable=not progress, leave=False)
    for chunk in qdata.batches(samples, batch_size):
        b = qdata.collate(chunk, processor)
        inputs = _to(b, device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        last = answer_logits(model, processor, b, inputs)                            # (B, V)
        scores = last[:, letter_ids].float()                                           # (B, n_letters)
        for row, s in enumerate(chunk):
            pred[s["id"]] = int(scores[row, : len(s["choices"])].argmax())
        bar.update(len(chunk))
    bar.close()
    return [pred[s["id"]] for s in samples]


def evaluate(model, processor, samples: list[dict], batch_size: int = 32, progress: bool = True,
             model_name: str = "", predictions: list[int] | None = None) -> dict:
    """{"accuracy", "per_category", "n", "model"} with accuracies in [0, 1] (`predictions`: already computed)."""
    preds = predictions if predictions is not None else predict(model, processor, samples, batch_size, progress)
    hits, tot = defaultdict(int), defaultdict(int)
    for s, p in zip(samples, preds):
        tot[s["category"]] += 1
        hits[s["category"]] += int(p == s["answer"])
    n = len(samples)
    return {"accuracy": sum(hits.values()) / n, "n": n, "model": model_name,
            "per_category": {c: hits[c] / tot[c] for c in sorted(tot)}}


def chance_accuracy(samples: list[dict]) -> float:
    """Expected accuracy of uniform guessing over each sample's choices."""
    return sum(1 / len(s["choices"]) for s in samples) / len(samples)


def majority_accuracy(samples: list[dict]) -> float:
    """Accuracy of the best constant predictor: always answering the same choice position (the position that is
    most often correct). A model at or below this level, or below chance, ranks nothing."""
    positions = range(max(len(s["choices"]) for s in samples))
    return max(sum(s["answer"] == k for s in samples) for k in positions) / len(samples)


@torch.no_grad()
def output_error(model_q: nn.Module, model_fp: nn.Module, processor, samples: list[dict], batch_size: int = 16) -> dict:
    """How far the quantized model's answer distribution is from the FP model's, at the answer position:
    kl = mean KL(p_fp || p_q) of the next-token distributions (nats), mse = mean squared logit error per vocab entry."""
    kl, mse, n = 0.0, 0.0, 0
    for chunk in qdata.batches(samples, batch_size):
        b = qdata.collate(chunk, processor)
        outs = []
        for m in (model_fp, model_q):
            dev, dtype = next(m.parameters()).device, next(m.parameters()).dtype
            inp = _to(b, dev)
            if "pixel_values" in inp:
                inp["pixel_values"] = inp["pixel_values"].to(dtype)
            outs.append(answer_logits(m, processor, b, inp).float().cpu())          # (B, V) at the answer position
        lp_fp, lp_q = outs[0].log_softmax(-1), outs[1].log_softmax(-1)
        kl += float((lp_fp.exp() * (lp_fp - lp_q)).sum())
        mse += float((outs[0] - outs[1]).pow(2).mean(-1).sum())
        n += len(chunk)
    return dict(kl=kl / n, mse=mse / n, n=n)
