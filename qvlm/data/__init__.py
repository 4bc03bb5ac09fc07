"""Data: the synthetic testbed set and ScienceQA (local Hugging Face parquet copy), in one sample format,
plus LLaVA's ScienceQA prompt protocol and batching.

Sample = dict(id, image (H, W, 3) uint8 or None, question, choices [str], answer int, category str, split str).

Prompt (LLaVA-1.5 ScienceQA protocol, `llava/eval/model_vqa_science.py` + `llava_v1` conversation):
    USER: <image>\\n{question}\\nA. {choice0}\\nB. {choice1}...\\nAnswer with the option's letter from the given
    choices directly. ASSISTANT:
The model answers with a letter; accuracy = letter match.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..errors import QVLMError
from . import synthetic

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
SPLIT_NAMES = ("train", "val", "test")


def prompt(sample: dict, image_token: str = "<image>") -> str:
    """The LLaVA ScienceQA prompt for one sample (an image placeholder only when the sample has an image)."""
    opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(sample["choices"]))
    img = f"{image_token}\n" if sample.get("image") is not None else ""
    return f"USER: {img}{sample['question']}\n{opts}\n{INSTRUCTION} ASSISTANT:"


def load_split(dataset: str = "tiny", split: str = "test", limit: int = 0, seed: int = 0) -> list[dict]:
    """Samples of `split` from the synthetic testbed set ("tiny") or a local ScienceQA parquet directory.

    `limit` > 0 keeps the first `limit` samples (a deterministic prefix, so smoke runs are subsets of full runs)."""
    if split not in SPLIT_NAMES:
        raise QVLMError(f"unknown split {split!r}", f"use one of {', '.join(SPLIT_NAMES)}")
    if dataset == "tiny":
        n = synthetic.SPLITS[split]
        samples = synthetic.generate(split, n=min(limit, n) if limit else n, seed=seed)
    else:
        samples = load_scienceqa(dataset, split)
    return samples[:limit] if limit else samples


def calibration_set(dataset: str = "tiny", n: int = 64, seed: int = 0) -> list[dict]:
    """`n` calibration samples drawn (seeded) from the TRAIN split only -- never val or test."""
    if not isinstance(n, int) or n < 1:
        raise QVLMError(f"empty calibration set (n={n})", "ask for at least 1 calibration sample")
    pool = load_split(dataset, "train", limit=max(4 * n, 256) if dataset == "tiny" else 0, seed=0)
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(idx)]


# ------------------------------------------------------------------------------------------- ScienceQA parquet
def _find_parquet(root: Path, split: str) -> list[Path]:
    names = {"val": ("validation", "val")}.get(split, (split,))
    files = sorted(p for p in root.rglob("*.parquet") if any(p.name.startswith(n) or p.parent.name == n for n in names))
    return files


def load_scienceqa(path: str, split: str) -> list[dict]:
    """ScienceQA from a local copy in the Hugging Face parquet layout (derek-thomas/ScienceQA:
    data/{train,validation,test}-*.parquet with image, question, choices, answer, subject, category, ...).

    The per-category key is `subject` (natural / social / language science), ScienceQA's NAT/SOC/LAN columns."""

    root = Path(path)
    if not root.is_dir():
        raise QVLMError(f"dataset {path!r} is neither 'tiny' nor a directory",
                        "pass 'tiny' or a local ScienceQA copy in the Hugging Face parquet layout")
    files = _find_parquet(root, split)
    if not files:
        raise QVLMError(f"no {split} split in {path} (expected {split}-*.parquet)",
                        "download ScienceQA's parquet files into that directory, or pick another split")
    out = []
    for f in files:
        try:
            rows = pq.read_table(f).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise QVLMError(f"cannot read {f}: {type(e).__name__}", "re-download that parquet file") from None
        for r in rows:
            img = r.get("image")
            if isinstance(img, dict) and img.get("bytes"):
                img = np.asarray(Image.open(io.BytesIO(img["bytes"])).convert("RGB"))
            else:
                img = None
            out.append(dict(id=f"{split}-{len(out)}", image=img, question=r["question"], choices=list(r["choices"]),
                            answer=int(r["answer"]), category=str(r.get("subject") or r.get("category") or "all"),
                            split=split))
    return out


# ------------------------------------------------------------------------------------------------- batching
def letter_token_ids(tokenizer, n: int) -> list[int]:
    """Token id of each answer letter as the model emits it right after "ASSISTANT:".

    SentencePiece tokenizers (LLaMA) emit "▁A"; word-level tokenizers emit "A". We encode " A" and take the last
    token, which is the standalone-letter token in both cases."""
    ids = []
    for letter in LETTERS[:n]:
        toks = tokenizer.encode(f" {letter}", add_special_tokens=False)
        ids.append(toks[-1])
    assert len(set(ids)) == n, f"answer letters do not map to distinct tokens: {ids}"
    return ids


def collate(samples: list[dict], processor, with_answer: bool = False) -> dict:
    """Tokenize a batch with the model's processor. Returns input_ids, attention_mask, pixel_values (if images),
    `last` (index of each row's last prompt token) and `answer` (B,) long.

    With `with_answer`, the answer letter is appended to each prompt (for training / calibration of the
    auto-regressive loss) and `labels` marks only that token."""
    tok = processor.tokenizer
    texts = [prompt(s, getattr(processor, "image_token", "<image>")) for s in samples]
    if with_answer:
        texts = [t + f" {LETTERS[s['answer']]}" for t, s in zip(texts, samples)]
    images = [s["image"] for s in samples if s.get("image") is not None]
    if images and len(images) != len(samples):
        raise QVLMError("a batch mixes samples with and without images", "batch image and text-only samples apart")
    kw = dict(text=texts, return_tensors="pt", padding=True)
    batch = processor(images=images, **kw) if images else tok(**kw)
    mask = batch["attention_mask"]
    if tok.padding_side == "left":
        last = torch.full((len(samples),), mask.shape[1] - 1)
    else:
        last = mask.sum(1) - 1
    out = dict(batch)
    out["answer"] = torch.tensor([s["answer"] for s in samples])
    if with_answer:
        labels = torch.full_like(batch["input_ids"], -100)
        rows = torch.arange(len(samples))
        labels[rows, last] = batch["input_ids"][rows, last]
        out["labels"] = labels
        last = last - 1                      # the answer is predicted from the token before it
    out["last"] = last
    return out


def batches(samples: list[dict], batch_size: int):
    """Consecutive chunks; image and text-only samples are never mixed within a chunk."""
    groups = [[s for s in samples if s.get("image") is not None], [s for s in samples if s.get("image") is None]]
    for g in groups:
        for i in range(0, len(g), batch_size):
            yield g[i:i + batch_size]


def category_counts(samples: list[dict]) -> dict[str, int]:
    """{category: number of samples}, in first-appearance order."""
    out: dict[str, int] = {}
    for s in samples:
        out[s["category"]] = out.get(s["category"], 0) + 1
    return out
