"""Train the embedded testbed: `python -m qvlm.testbed.train [--out data/tiny] [--smoke]`.

A 2-core CPU cannot train a VLM naively end to end (a 1M-parameter LLaVA stays at the answer prior for hundreds
of steps: the answer barely depends on the image at first, so the gradient reaching the vision tower is tiny).
So we use the staged recipe of LLaVA itself, in small:

  stage 1  vision pretraining: the CLIP tower + throw-away linear heads predict, for each cell of the scene,
           presence / colour / shape / size and the cell index from the cell's patch tokens (dense, image-only
           supervision; the cell index makes each image token carry where it is, which "where is ..." needs).
  stage 2  alignment (LLaVA's "feature alignment" stage): vision frozen; projector + Llama trained on a mix of
           four supervised tasks (see `Tensors`): the multiple-choice questions (answer letter), captions
           ("top left small red square ; ..."), the answer in words, and a text-only option-lookup task.
  stage 3  end-to-end instruction tuning: every parameter, mostly multiple-choice questions, lower LR.

A first attempt with captions + questions only stayed at chance (39 % test, chance 30 %) after 3,500 steps:
the step "find the answer among the choices, emit its letter" is an induction/copy operation that a small
transformer learns late. Supervising each hop on its own (word answers; text-only lookup) fixes that.

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
from transformers import LlavaForConditionalGeneration

from .. import data as qdata
from ..data import synthetic
from ..evaluate import chance_accuracy, evaluate
from ..models import llava, load
from ..models.tiny import ARCH, build_config, build_processor
from ..paths import TINY_DIR
from ..utils import atomic_dir, atomic_write_json, seed_everything

# Recipe (full). Steps chosen to fit < 60 min on 2 CPU cores.
RECIPE = dict(n_train=20000, stage1_steps=1000, stage1_lr=2e-3, stage2_steps=1200, stage2_lr=1.5e-3,
              stage3_steps=3000, stage3_lr=7e-4, batch_size=64, weight_decay=0.01,
              stage2_mix=dict(qa=0.4, caption=0.3, word=0.2, lookup=0.1),
              stage3_mix=dict(qa=0.7, caption=0.1, word=0.1, lookup=0.1))
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


def _labelled(tok, prompts, answers):
    """Tokenize prompt + answer; labels supervise the answer tokens only."""
    enc = tok([p + " " + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True)
    n_prompt = [len(tok(p)["input_ids"]) for p in prompts]
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, n in enumerate(n_prompt):
        labels[i, :n] = -100
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)


class Tensors:
    """The training set, tokenized once: pixel values, cell targets and four supervised sequence tasks.

    qa       the real task: ScienceQA prompt -> answer letter
    caption  "describe the image ." -> every object's cell, size, colour, shape (reading the image)
    word     the question -> the answer in words (hop 1: image + question -> answer)
    lookup   text only: "which option is X ?" + the lettered choices -> X's letter (hop 2: an induction /
             copy task; without it the letter-matching step is learned very late)
    """

    TASKS = ("qa", "caption", "word", "lookup")

    def __init__(self, samples, processor, rng):
        tok = processor.tokenizer
        self.pixels = torch.cat([processor.image_processor(images=[s["image"] for s in samples[i:i + 512]],
                                                           return_tensors="pt")["pixel_values"]
                                 for i in range(0, len(samples), 512)])
        img = " ".join(["<image>"] * (ARCH["image_size"] // ARCH["patch_size"]) ** 2)
        L = qdata.LETTERS
        qa_p = [qdata.prompt(s).replace("<image>", img) for s in samples]
        cap_p = [f"USER: {img}\ndescribe the image . ASSISTANT:" for _ in samples]
        word_p = [f"USER: {img}\n{s['question']}\nAnswer with a word . ASSISTANT:" for s in samples]
        pick = [int(rng.integers(len(s["choices"]))) for s in samples]
        look_p = [qdata.prompt({**s, "image": None, "question": f"which option is {s['choices'][k]} ?"})
                  for s, k in zip(samples, pick)]
        self.seq = {
            "qa": _labelled(tok, qa_p, [L[s["answer"]] for s in samples]),
            "caption": _labelled(tok, cap_p, [s["caption"] + " </s>" for s in samples]),
            "word": _labelled(tok, word_p, [s["choices"][s["answer"]] for s in samples]),
            "lookup": _labelled(tok, look_p, [L[k] for k in pick]),
        }
        self.cells = torch.from_numpy(np.stack([_cell_targets(s) for s in samples]))
        self.n = len(samples)


def _schedule(opt, steps, lr, warmup=50):
    def f(i):
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup)))) * 0.95 + 0.05
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _cell_pool(h: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (B, 1 + grid^2, C) -> mean over each quadrant cell of the scene: (B, 4, C)."""
    b, _, c = h.shape
    p = h[:, 1:].reshape(b, grid, grid, c)
    g = max(1, grid // 2)
    cells = [p[:, r * g:(r + 1) * g, q * g:(q + 1) * g].mean((1, 2)) for r in (0, 1) for q in (0, 1)]
    return torch.stack(cells, 1)


def stage1_vision(model, T: Tensors, steps, lr, bs, rng, wd):
    vision = llava.parts(model)["vision"].module
    c = model.config.vision_config.hidden_size
    heads = nn.ModuleList([nn.Linear(c, 2), nn.Linear(c, len(synthetic.COLOURS) + 1),
                           nn.Linear(c, len(synthetic.SHAPES) + 1), nn.Linear(c, len(synthetic.SIZES) + 1),
                           nn.Linear(c, 4)])   # + the cell index itself, so each token also says WHERE it is
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sch = _schedule(opt, steps, lr)
    grid = ARCH["image_size"] // ARCH["patch_size"]
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="stage 1: vision")
    for _ in bar:
        idx = torch.from_numpy(rng.choice(T.n, bs, replace=False))
        h = vision(pixel_values=T.pixels[idx]).last_hidden_state
        cells = _cell_pool(h, grid)                                     # (B, 4, C)
        tgt = T.cells[idx]                                              # (B, 4, 4)
        tgt = torch.cat([tgt, torch.arange(4).expand(len(idx), 4)[..., None]], -1)   # (B, 4, 5)
        loss = sum(F.cross_entropy(hd(cells).flatten(0, 1), tgt[..., k].flatten()) for k, hd in enumerate(heads))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sch.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def _lm_step(model, T: Tensors, idx, mix: dict, rng):
    """One mixed batch: each row gets a task drawn from `mix`; returns (loss, {task: loss})."""
    tasks = rng.choice(list(mix), size=len(idx), p=np.array(list(mix.values())) / sum(mix.values()))
    loss, parts = 0.0, {}
    for task in mix:
        ii = idx[torch.from_numpy(tasks == task)]
        if len(ii) == 0:
            continue
        src = T.seq[task]
        n = int(src["attention_mask"][ii].sum(1).max())
        out = model(input_ids=src["input_ids"][ii, :n], attention_mask=src["attention_mask"][ii, :n],
                    pixel_values=None if task == "lookup" else T.pixels[ii], labels=src["labels"][ii, :n])
        loss = loss + out.loss * len(ii) / len(idx)
        parts[task] = out.loss.item()
    return loss, parts


def stage_lm(model, T, steps, lr, bs, rng, wd, mix, train_vision, desc):
    vision = llava.parts(model)["vision"].module
    for p in vision.parameters():
        p.requires_grad_(train_vision)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sch = _schedule(opt, steps, lr)
    bar = tqdm(range(steps), desc=desc)
    model.train()
    ema = {}
    for _ in bar:
        idx = torch.from_numpy(rng.choice(T.n, bs, replace=False))
        loss, parts = _lm_step(model, T, idx, mix, rng)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sch.step()
        ema = {k: 0.95 * ema.get(k, v) + 0.05 * v for k, v in parts.items()} | {k: v for k, v in ema.items() if k not in parts}
        bar.set_postfix({k: f"{v:.2f}" for k, v in sorted(ema.items())})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {k: round(v, 4) for k, v in ema.items()}


def train(out: Path = TINY_DIR, seed: int = 0, smoke: bool = False, init: str = "", **overrides) -> dict:
    """Train the testbed with the staged recipe; returns the record written to `testbed.json`.

    `init`: start from an existing checkpoint directory instead of random weights (continued training; its
    record is kept under `previous` so the full history of commands is in testbed.json)."""
    r = {**RECIPE, **(SMOKE if smoke else {}), **overrides}
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    if init:
        model, processor = load(init)
        model.train()
        previous = json.loads((Path(init) / "testbed.json").read_text()) if (Path(init) / "testbed.json").exists() else {}
    else:
        processor = build_processor()
        model = LlavaForConditionalGeneration(build_config(processor.tokenizer))
        previous = None
    samples = synthetic.generate("train", n=r["n_train"], seed=seed)
    T = Tensors(samples, processor, rng)
    losses = {}
    losses["stage1"] = stage1_vision(model, T, r["stage1_steps"], r["stage1_lr"], r["batch_size"], rng, r["weight_decay"])
    losses["stage2"] = stage_lm(model, T, r["stage2_steps"], r["stage2_lr"], r["batch_size"], rng, r["weight_decay"],
                                r["stage2_mix"], train_vision=False, desc="stage 2: align")
    losses["stage3"] = stage_lm(model, T, r["stage3_steps"], r["stage3_lr"], r["batch_size"], rng, r["weight_decay"],
                                r["stage3_mix"], train_vision=True, desc="stage 3: end to end")
    train_seconds = time.time() - t0
    test = qdata.load_split("tiny", "test", limit=200 if smoke else 0, seed=seed)
    val = qdata.load_split("tiny", "val", limit=200 if smoke else 0, seed=seed)
    res_test = evaluate(model, processor, test, batch_size=64, model_name="tiny")
    res_val = evaluate(model, processor, val, batch_size=64, model_name="tiny")
    record = dict(recipe=r, seed=seed, train_seconds=round(train_seconds, 1), final_losses=losses,
                  n_params=sum(p.numel() for p in model.parameters()), arch=ARCH,
                  fp_test=res_test, fp_val=res_val, chance_test=chance_accuracy(test),
                  torch=torch.__version__, smoke=smoke, init=init, previous=previous)
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
    ap.add_argument("--init", default="", help="continue training from this checkpoint directory")
    ap.add_argument("--stage3-lr", type=float, default=None)
    for k in ("stage1_steps", "stage2_steps", "stage3_steps", "n_train", "batch_size"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    args = ap.parse_args(argv)
    over = {k: v for k, v in vars(args).items() if k in RECIPE and v is not None}
    rec = train(Path(args.out), seed=args.seed, smoke=args.smoke, init=args.init, **over)
    print(json.dumps({k: rec[k] for k in ("train_seconds", "fp_test", "chance_test", "n_params")}, indent=1))


if __name__ == "__main__":
    main()
