"""Evaluation: multiple-choice accuracy, overall and per category, following LLaVA's ScienceQA protocol.

Deterministic scoring: one forward pass per batch; the prediction is the argmax, over the sample's choice
letters only (A, B, ... up to its number of choices), of the next-token logits after "ASSISTANT:". This is
greedy decoding restricted to valid answers (LLaVA's eval decodes freely and parses "ANSWER: X"; restricting to
the letters removes parse failures and sampling noise, so the same model always gives the same number).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from . import data as qdata
from .errors import QVLMError


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


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
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs.get("pixel_values")).logits        # (B, T, V)
        last = logits[torch.arange(len(chunk), device=device), b["last"].to(device)]   # (B, V)
        scores = last[:, letter_ids].float()                                           # (B, n_letters)
        for row, s in enumerate(chunk):
            pred[s["id"]] = int(scores[row, : len(s["choices"])].argmax())
        bar.update(len(chunk))
    bar.close()
    return [pred[s["id"]] for s in samples]


def evaluate(model, processor, samples: list[dict], batch_size: int = 32, progress: bool = True,
             model_name: str = "") -> dict:
    """{"accuracy", "per_category", "n", "model"} with accuracies in [0, 1]."""
    preds = predict(model, processor, samples, batch_size, progress)
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
