"""The embedded testbed: a small model with exactly llava-hf LLaVA-1.5's classes.

    LlavaForConditionalGeneration = CLIP vision tower -> 2-layer GELU projector -> Llama decoder (GQA)
    tokenizer: a word-level PreTrainedTokenizerFast over the synthetic set's vocabulary
    processor: LlavaProcessor(CLIPImageProcessorPil, tokenizer), saved with save_pretrained like llava-hf

Differences from LLaVA-1.5 are sizes only, plus `vision_feature_layer=-1` (LLaVA uses -2; with 4 CLIP layers we
keep the last one in use so every vision linear matters for quantization).
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from ..data import LETTERS, INSTRUCTION, synthetic

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

# Sizes (the only thing that differs from LLaVA-1.5). Chosen so training takes < 60 min on 2 CPU cores.
ARCH = dict(
    image_size=synthetic.IMAGE_SIZE, patch_size=16,                 # 2 x 2 = 4 image tokens, one per scene cell
    vision_hidden=96, vision_layers=4, vision_heads=4, vision_mlp=384,
    text_hidden=128, text_layers=6, text_heads=4, text_kv_heads=2, text_mlp=384,
)


def build_tokenizer() -> PreTrainedTokenizerFast:

    words = set(synthetic.vocabulary()) | set(LETTERS) | {"USER", "ASSISTANT", ":", "."}
    words |= {w for w in INSTRUCTION.replace("'", " ' ").replace(".", " . ").split()}
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words - set(SPECIALS)))}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def build_processor(tokenizer=None) -> LlavaProcessor:
    s = ARCH["image_size"]
    ip = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer or build_tokenizer(), patch_size=ARCH["patch_size"],
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def build_config(tokenizer, **overrides) -> LlavaConfig:
    a = {**ARCH, **overrides}
    vc = CLIPVisionConfig(hidden_size=a["vision_hidden"], intermediate_size=a["vision_mlp"],
                          num_hidden_layers=a["vision_layers"], num_attention_heads=a["vision_heads"],
                          image_size=a["image_size"], patch_size=a["patch_size"], projection_dim=a["vision_hidden"])
    tc = LlamaConfig(hidden_size=a["text_hidden"], intermediate_size=a["text_mlp"], num_hidden_layers=a["text_layers"],
                     num_attention_heads=a["text_heads"], num_key_value_heads=a["text_kv_heads"],
                     vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     tie_word_embeddings=False)
    n_img = (a["image_size"] // a["patch_size"]) ** 2
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-1, image_seq_length=n_img, tie_word_embeddings=False)


def build_random(seed: int = 0, **overrides):
    """A randomly initialised testbed-shaped model + processor (for tests of code paths, not accuracy)."""
    torch.manual_seed(seed)
    processor = build_processor()
    model = LlavaForConditionalGeneration(build_config(processor.tokenizer, **overrides)).eval()
    return model, processor
