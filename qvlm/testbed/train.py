"""Train the embedded testbed: `python -m qvlm.testbed.train [--out data/tiny] [--smoke]`.

A 2-core CPU cannot train a VLM naively end to end (a 1M-parameter LLaVA stays at the answer prior for hundreds
of steps: the answer barely depends on the image at first, so the gradient reaching the vision tower is tiny).
So we use the staged recipe of LLaVA itself, in small:

  stage 1  vision pretraining: the CLIP tower + throw-away linear heads predict, for each cell of the scene,
           presence / colour / shape / size from the cell's patch tokens (dense, image-only supervision).
  stage 2  alignment (LLaVA's "feature alignment" stage): vision frozen; projector + Llama trained on a mix of
           captions ("top left small red square ; ...", every caption token supervised) and the multiple-choice
           questions (answer letter supervised).
  stage 3  end-to-end instruction tuning: every parameter, multiple-choice questions (+ captions), lower LR.

Fixed seed, deterministic data; the script writes the checkpoint atomically (save_pretrained: safetensors,
config, tokenizer, processor) and `data/tiny/testbed.json` with the recipe and the FP accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import data as qdata
from ..data import synthetic
from ..evaluate import chance_accuracy, evaluate
from ..models import llava
from ..models.tiny import ARCH, build_config, build_processor
from ..paths import TINY_DIR
from ..utils import atomic_dir, atomic_write_json, seed_everything

# Recipe (full). Steps chosen to fit < 60 min on 2 CPU cores.
RECIPE = dict(n_train=20000, stage1_steps=600, stage1_lr=2e-3, stage2_steps=2000, stage2_lr=1.5e-3,
              stage3_steps=1500, stage3_lr=5e-4, batch_size=64, caption_frac=0.5, weight_decay=0.01)
SMOKE = dict(n_train=512, stage1_steps=10, stage2_steps=10, stage3_steps=10, batch_size=16)


def _cell_targets(s: dict) -> np.ndarray:
    """(4 cells, 4 attrs): presence, colour+1, shape+1, size+1 (0 = empty) -- parsed from the caption."""
    t = np.zeros((4, 4), np.int64)
    if not s["caption"]:
        return t
    for part in s["caption"].split(" ; "):
        w = part.split()
        cell = synthetic.CELLS.index(" ".join(w[:2]))
        t[cell] = [1, list(synthetic.COLOURS).index(w[3]) + 1, synthetic.SHAPES.index(w[4]) + 1,
                   synthetic.SIZES.index(w[2]) + 1]
    return t


class Tensors:
    """The training set, tokenized once: pixel values, QA sequences, caption sequences, cell targets."""

    def __init__(self, samples, processor):
        tok = processor.tokenizer
        self.pixels = torch.cat([processor.image_processor(images=[s["image"] for s in samples[i:i + 512]],
                                                           return_tensors="pt")["pixel_values"]
                                 for i in range(0, len(samples), 512)])
        img = " ".join(["<image>"] * (ARCH["image_size"] // ARCH["patch_size"]) ** 2)
        qa = [qdata.prompt(s).replace("<image>", img) + f" {qdata.LETTERS[s['answer']]}" for s in samples]
        cap = [f"USER: {img}\ndescribe the image . ASSISTANT: {s['caption']} </s>" for s in samples]
        self.qa = tok(qa, return_tensors="pt", padding=True)
        self.cap = tok(cap, return_tensors="pt", padding=True)
        n_prompt_cap = len(tok(f"USER: {img}\ndescribe the image . ASSISTANT:")["input_ids"])
        self.qa_labels = torch.full_like(self.qa["input_ids"], -100)
        last = self.qa["attention_mask"].sum(1) - 1
        self.qa_labels[torch.arange(len(samples)), last] = self.qa["input_ids"][torch.arange(len(samples)), last]
        self.cap_labels = self.cap["input_ids"].masked_fill(self.cap["attention_mask"] == 0, -100)
        self.cap_labels[:, :n_prompt_cap] = -100
        self.cells = torch.from_numpy(np.stack([_cell_targets(s) for s in samples]))
        self.n = len(samples)


def _schedule(opt, steps, lr, warmup=50):
    def f(i):
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup)))) * 0.95 + 0.05
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _cell_pool(h: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (B, 1 + grid^2, C) -> mean over each 2x2 quadrant cell: (B, 4, C)."""
    b, _, c = h.shape
    p = h[:, 1:].reshape(b, grid, grid, c)
    g = grid // 2
    cells = [p[:, r * g:(r + 1) * g, q * g:(q + 1) * g].mean((1, 2)) for r in (0, 1) for q in (0, 1)]
    return torch.stack(cells, 1)


def stage1_vision(model, T: Tensors, steps, lr, bs, rng, wd):
    vision = llava.parts(model)["vision"].module
    c = model.config.vision_config.hidden_size
    heads = nn.ModuleList([nn.Linear(c, 2), nn.Linear(c, len(synthetic.COLOURS) + 1),
                           nn.Linear(c, len(synthetic.SHAPES) + 1), nn.Linear(c, len(synthetic.SIZES) + 1)])
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sch = _schedule(opt, steps, lr)
    grid = ARCH["image_size"] // ARCH["patch_size"]
    bar = tqdm(range(steps), desc="stage 1: vision")
    for _ in bar:
        idx = torch.from_numpy(rng.choice(T.n, bs, replace=False))
        h = vision(pixel_values=T.pixels[idx]).last_hidden_state
        cells = _cell_pool(h, grid)                                     # (B, 4, C)
        tgt = T.cells[idx]                                              # (B, 4, 4)
        loss = sum(F.cross_entropy(hd(cells).flatten(0, 1), tgt[..., k].flatten()) for k, hd in enumerate(heads))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sch.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def _lm_step(model, T: Tensors, idx, caption_frac, rng):
    use_cap = rng.random(len(idx)) < caption_frac
    loss = 0.0
    for src, labels, sel in ((T.cap, T.cap_labels, use_cap), (T.qa, T.qa_labels, ~use_cap)):
        ii = idx[torch.from_numpy(sel)]
        if len(ii) == 0:
            continue
        L = int(src["attention_mask"][ii].sum(1).max())
        out = model(input_ids=src["input_ids"][ii, :L], attention_mask=src["attention_mask"][ii, :L],
                    pixel_values=T.pixels[ii], labels=labels[ii, :L])
        loss = loss + out.loss * len(ii) / len(idx)
    return loss


def stage_lm(model, T, steps, lr, bs, rng, wd, caption_frac, train_vision, desc):
    vision = llava.parts(model)["vision"].module
    for p in vision.parameters():
        p.requires_grad_(train_vision)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sch = _schedule(opt, steps, lr)
    bar = tqdm(range(steps), desc=desc)
    model.train()
    for _ in bar:
        idx = torch.from_numpy(rng.choice(T.n, bs, replace=False))
        loss = _lm_step(model, T, idx, caption_frac, rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sch.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return loss.item()


def train(out: Path = TINY_DIR, seed: int = 0, smoke: bool = False, **overrides) -> dict:
    """Train the testbed with the staged recipe; returns the record written to `testbed.json`."""
    r = {**RECIPE, **(SMOKE if smoke else {}), **overrides}
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    processor = build_processor()
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer))
    samples = synthetic.generate("train", n=r["n_train"], seed=seed)
    T = Tensors(samples, processor)
    losses = {}
    losses["stage1"] = stage1_vision(model, T, r["stage1_steps"], r["stage1_lr"], r["batch_size"], rng, r["weight_decay"])
    losses["stage2"] = stage_lm(model, T, r["stage2_steps"], r["stage2_lr"], r["batch_size"], rng, r["weight_decay"],
                                r["caption_frac"], train_vision=False, desc="stage 2: align")
    losses["stage3"] = stage_lm(model, T, r["stage3_steps"], r["stage3_lr"], r["batch_size"], rng, r["weight_decay"],
                                r["caption_frac"] / 2, train_vision=True, desc="stage 3: end to end")
    train_seconds = time.time() - t0
    test = qdata.load_split("tiny", "test", limit=200 if smoke else 0, seed=seed)
    val = qdata.load_split("tiny", "val", limit=200 if smoke else 0, seed=seed)
    res_test = evaluate(model, processor, test, batch_size=64, model_name="tiny")
    res_val = evaluate(model, processor, val, batch_size=64, model_name="tiny")
    record = dict(recipe=r, seed=seed, train_seconds=round(train_seconds, 1), final_losses=losses,
                  n_params=sum(p.numel() for p in model.parameters()), arch=ARCH,
                  fp_test=res_test, fp_val=res_val, chance_test=chance_accuracy(test),
                  torch=torch.__version__, smoke=smoke)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "testbed.json", record)
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(TINY_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the recipe runs (minutes), not accuracy")
    for k in ("stage1_steps", "stage2_steps", "stage3_steps", "n_train", "batch_size"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    args = ap.parse_args(argv)
    over = {k: v for k, v in vars(args).items() if k in RECIPE and v is not None}
    rec = train(Path(args.out), seed=args.seed, smoke=args.smoke, **over)
    print(json.dumps({k: rec[k] for k in ("train_seconds", "fp_test", "chance_test", "n_params")}, indent=1))


if __name__ == "__main__":
    main()
