"""Structure discovery for LLaVA-architecture models (llava-hf `LlavaForConditionalGeneration`).

Everything downstream (quantization scope, block-wise calibration, entropy, partition) asks THIS module what the
model looks like: the vision tower's transformer layers, the projector, the LLM decoder layers, and every
`nn.Linear` inside them, in forward order. Nothing else in the repo hard-codes widths, depths or token counts.

    parts(model)          -> {"vision": Part, "projector": Part, "llm": Part}
    blocks(model, scope)  -> [Block] in forward order (vision layers, projector, decoder layers)
    linear_layers(model, scope) -> [LinearInfo] in forward order
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import SCOPES
from ..errors import QVLMError


@dataclass
class Part:
    name: str                 # "vision" | "projector" | "llm"
    module: nn.Module         # the sub-model (vision tower, projector, language model)
    blocks: list              # its repeated units: transformer layers (vision, llm) or [projector]


@dataclass
class Block:
    part: str                 # "vision" | "projector" | "llm"
    index: int                # index within its part
    module: nn.Module
    name: str                 # qualified module name in the model

    @property
    def key(self) -> str:
        return f"{self.part}.{self.index}"


@dataclass
class LinearInfo:
    name: str                 # qualified module name, e.g. "model.language_model.layers.3.mlp.down_proj"
    part: str
    block: int                # index of the block within its part
    short: str                # name inside the block, e.g. "mlp.down_proj"
    module: nn.Module

    @property
    def key(self) -> str:
        return f"{self.part}.{self.block}.{self.short}"


def _first_attr(obj, paths):
    for path in paths:
        cur = obj
        for attr in path.split("."):
            cur = getattr(cur, attr, None)
            if cur is None:
                break
        if cur is not None:
            return cur, path
    return None, None


def _largest_modulelist(module: nn.Module) -> tuple[nn.ModuleList | None, str]:
    best, best_name = None, ""
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best)):
            best, best_name = m, name
    return best, best_name


def parts(model: nn.Module) -> dict[str, Part]:
    """Find the vision tower, projector and language model of a LLaVA-architecture model."""
    vision, vpath = _first_attr(model, ["model.vision_tower", "vision_tower"])
    proj, ppath = _first_attr(model, ["model.multi_modal_projector", "multi_modal_projector"])
    llm, lpath = _first_attr(model, ["model.language_model", "language_model.model", "language_model"])
    if vision is None or proj is None or llm is None:
        raise QVLMError(f"unsupported architecture {type(model).__name__}: no vision tower / projector / language "
                        "model found", "use a llava-hf LlavaForConditionalGeneration checkpoint")
    vlayers, _ = _largest_modulelist(vision)
    llayers, _ = _largest_modulelist(llm)
    if not vlayers or not llayers:
        raise QVLMError(f"unsupported architecture {type(model).__name__}: no transformer layers found",
                        "use a llava-hf LlavaForConditionalGeneration checkpoint")
    return {"vision": Part("vision", vision, list(vlayers)),
            "projector": Part("projector", proj, [proj]),
            "llm": Part("llm", llm, list(llayers))}


def blocks(model: nn.Module, scope=SCOPES) -> list[Block]:
    """Repeated units in forward order: vision layers, then the projector, then decoder layers."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for pname, part in parts(model).items():
        if pname in scope:
            out += [Block(pname, i, b, names[id(b)]) for i, b in enumerate(part.blocks)]
    return out


def linear_layers(model: nn.Module, scope=SCOPES) -> list[LinearInfo]:
    """Every nn.Linear inside the scoped blocks, in forward order within each block.

    Forward order inside a block is ranked by the linears' short names (`_CANONICAL`: attention inputs, attention
    output, MLP), since construction order is not execution order (CLIP builds k before q); unknown names follow
    in construction order. Checked against a traced forward (tests/unit/test_linear_order.py) for CLIP, LLaMA and
    DINOv2, under transformers 5 names (q_proj / k_proj / v_proj / o_proj / fc1 / fc2) and 4.x names (query / key /
    value / dense)."""
    out = []
    for blk in blocks(model, scope):
        lins = [(n, m) for n, m in blk.module.named_modules() if isinstance(m, nn.Linear)]
        order = _forward_order(blk.module, [m for _, m in lins])
        for n, m in sorted(lins, key=lambda nm: order.get(id(nm[1]), 1 << 30)):
            out.append(LinearInfo(f"{blk.name}.{n}", blk.part, blk.index, n, m))
    return out


# Execution order of the linears of a standard block, by their short names (q/k/v read the same input).
# DINOv2 / ViT under transformers 4.x name them attention.attention.{query,key,value}, attention.output.dense: without
# those names here fc1 / fc2 would rank before the attention. ("dense" ties are kept in construction order, which is
# execution order for ViT's attention.output.dense, intermediate.dense, output.dense.)
_CANONICAL = ["q_proj", "k_proj", "v_proj", "query", "key", "value", "out_proj", "o_proj", "dense", "fc1", "fc2",
              "gate_proj", "up_proj", "down_proj", "linear_1", "linear_2"]


def _forward_order(block: nn.Module, linears: list) -> dict[int, int]:
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in block.named_modules()}
    rank = {id(m): (_CANONICAL.index(names[id(m)]) if names[id(m)] in _CANONICAL else len(_CANONICAL) + i)
            for i, m in enumerate(linears)}
    return rank


def tied_embeddings(model: nn.Module) -> bool:
    """True when the lm_head shares its weight with the input embeddings (SmolLM2, tiny builds may)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def untie_lm_head(model: nn.Module, weight: torch.Tensor | None = None) -> None:
    """Give the lm_head its own weight (`weight`, default a copy of the shared one) and mark the configs untied, so
    that a transform can change the head without changing the embeddings."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter((head.weight if weight is None else weight).detach().clone(), requires_grad=False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg.tie_word_embeddings = False


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def summary(model: nn.Module) -> list[dict]:
    """One row per part: blocks, linear layers, their widths (discovered), parameter count."""
    rows = []
    for name, part in parts(model).items():
        lins = [m for b in part.blocks for m in b.modules() if isinstance(m, nn.Linear)]
        widths = sorted({m.in_features for m in lins} | {m.out_features for m in lins})
        rows.append(dict(part=name, blocks=len(part.blocks), linears=len(lins), widths=widths,
                         params=sum(p.numel() for p in part.module.parameters())))
    rows.append(dict(part="embeddings + lm_head (kept FP)", blocks=0, linears=1, widths=[],
                     params=sum(p.numel() for p in model.get_input_embeddings().parameters())
                     + sum(p.numel() for p in model.get_output_embeddings().parameters())))
    return rows
