"""Block-by-block sequential calibration: the driver every calibrated method runs in.

Q-VLM §3.2 searches rounding functions "jointly inside each block and sequentially across blocks"; GPTQ, AWQ and
BRECQ use the same sequential schedule. The driver walks the scoped blocks in forward order

    vision layers  ->  projector  ->  LLM decoder layers          (qvlm.models.llava.blocks)

and, for each *unit* (one block by default, or several consecutive blocks of one part, e.g. Q-VLM's
entropy-guided blocks), hands the method a `BlockData`:

    inputs[i]     (B, T, C) the unit's input for calibration batch i along the QUANTIZED path (the outputs of the
                  already-quantized earlier units): what the quantized unit sees at deployment.
    fp_inputs[i]  (B, T, C) the same input along the FP path (the unmodified model).
    targets[i]    (B, T, C) the FP unit's output on fp_inputs[i]: the FP model's activation, the reconstruction target.
    args/kwargs   the extra positional / keyword arguments the model passes to the blocks (decoder layers: causal
                  attention mask, rotary position embeddings, position ids), captured from a real forward.
    masks[i]      (B, T) bool, valid (non-padding) tokens.

The method edits the unit in place (its nn.Linear layers were already swapped for QuantLinear with RTN step
sizes). The driver then calibrates static activation ranges still missing, freezes the unit, and runs the
QUANTIZED unit on `inputs` to produce the next unit's inputs. Working memory beyond the model itself is one unit's
FP copy, the method's state for that unit, and the calibration activations of the two streams -- the schedule that
scales to 7B/13B. (The model stays where it was loaded; offloading the other blocks to CPU is not implemented.)

How inputs cross part boundaries (vision -> projector -> LLM): the projector's input is a selected vision hidden
state with the CLS token dropped, and the LLM's input embeddings receive the projector output scattered into the
image-token positions. Rather than re-implementing that glue, the driver captures the input (and args / kwargs)
of the FIRST unit of each part with a forward pre-hook during a real `model(...)` forward, aborted at the hook;
the earlier parts are already quantized in place at that moment, so the capture follows the quantized path.
Within a part the driver propagates directly (unit outputs -> next unit inputs, same args / kwargs), because
every layer of a part receives identical masks and position embeddings. The FP stream is captured the same way
once, before anything is modified.

Non-finite activations (NaN / Inf) anywhere raise QVLMError naming the unit; an empty calibration set raises too.

References: GPTQ `llama.py::llama_sequential` (Catcher + layer loop), llm-awq `pre_quant.py::run_awq`,
BRECQ `main_imagenet.py::recon_model`.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..errors import QVLMError
from ..models import llava
from .hooks import Stop, calib_batches, call_block, capture_inputs, image_token_id, same_input_groups, token_masks
from .qlinear import (ActQuantizer, QuantLinear, act_quantizers, check_model, quant_linears, quantize_module,
                      share_act_quantizer)


@dataclass
class BlockData:
    """Calibration data of one unit (see the module docstring for the fields)."""
    blocks: list                      # [llava.Block] consecutive blocks of one part; modules hold QuantLinears
    fp_blocks: list                   # [nn.Module] FP copies of the blocks (before any method touched them)
    inputs: list                      # [(B, T, C)] quantized-path inputs per calibration batch
    fp_inputs: list                   # [(B, T, C)] FP-path inputs
    targets: list                     # [(B, T, C)] FP unit outputs on fp_inputs
    args: list                        # [tuple] extra positional args per batch (after hidden_states)
    kwargs: list                      # [dict] keyword args per batch
    masks: list                       # [(B, T) bool] valid tokens
    stats: dict = field(default_factory=dict)
    image_masks: list = field(default_factory=list)   # [(B, T) bool] image-token positions (LLM units; else empty)
    iters: int | None = None          # optimisation steps granted to this unit by a fixed total budget (else None)

    @property
    def key(self) -> str:
        """'llm.3' for one block, 'llm.3-5' for a unit of several."""
        b = self.blocks
        return b[0].key if len(b) == 1 else f"{b[0].part}.{b[0].index}-{b[-1].index}"

    @property
    def modules(self) -> list[nn.Module]:
        return [b.module for b in self.blocks]

    def __len__(self) -> int:
        return len(self.inputs)

    def qlinears(self) -> list[tuple[str, QuantLinear]]:
        """('llm.3.self_attn.q_proj', layer) for every QuantLinear of the unit, in forward order."""
        out = []
        for b in self.blocks:
            qls = quant_linears(b.module)
            rank = llava._forward_order(b.module, [m for _, m in qls])      # same order as llava.linear_layers
            out += [(f"{b.key}.{n}", m) for n, m in sorted(qls, key=lambda nm: rank[id(nm[1])])]
        return out

    def act_quantizers(self) -> list[ActQuantizer]:
        """The distinct activation quantizers of the unit (a shared one once)."""
        seen, out = set(), []
        for b in self.blocks:
            for a in act_quantizers(b.module):
                if id(a) not in seen:
                    seen.add(id(a))
                    out.append(a)
        return out

    def fp_twin(self, key: str) -> nn.Module:
        """The FP copy of the unit's module `key` (e.g. 'llm.3.mlp.down_proj' -> that nn.Linear of the FP block)."""
        for b, fb in zip(self.blocks, self.fp_blocks):
            if key.startswith(b.key + "."):
                return fb.get_submodule(key[len(b.key) + 1:])
        raise KeyError(key)

    @torch.no_grad()
    def module_inputs(self, module: nn.Module, fp: bool = False) -> list[torch.Tensor]:
        """The input of `module` (a submodule of the unit, or of its FP copy with fp=True) for every calibration
        batch; each forward is aborted right after the capture."""
        got = []

        def hook(_mod, args):
            got.append(args[0])
            raise Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            for i in range(len(self)):
                with contextlib.suppress(Stop):
                    self.forward(i, fp=fp)
        finally:
            handle.remove()
        assert len(got) == len(self), f"{type(module).__name__} did not run for every batch"
        return got

    def forward(self, i: int, x: torch.Tensor | None = None, fp: bool = False) -> torch.Tensor:
        """Run the unit (quantized, or its FP copy with fp=True) on batch i's input (or on x)."""
        if x is None:
            x = self.fp_inputs[i] if fp else self.inputs[i]
        for m in (self.fp_blocks if fp else self.modules):
            x = call_block(m, x, self.args[i], self.kwargs[i])
        return x

    def local_targets(self) -> list[torch.Tensor]:
        """FP unit outputs on the QUANTIZED-path inputs (the target GPTQ / AWQ-style objectives use)."""
        with torch.no_grad():
            return [self.forward(i, self.inputs[i], fp=True) for i in range(len(self))]

    def tokens(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """The valid-token rows of t (B, T, C) -> (n_valid, C)."""
        return t[self.masks[i]]


def _check_finite(tensors, what: str, key: str) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise QVLMError(f"non-finite (NaN/Inf) activations {what} block {key} during calibration",
                            "check the checkpoint for NaN/Inf weights, or calibrate in float32 (--dtype float32)")


@torch.no_grad()
def observe_act_ranges(data: BlockData, quantizers: list[ActQuantizer] | None = None) -> None:
    """Calibrate the static per-tensor activation range (min/max over valid tokens) of the unit's activation
    quantizers that still need one, from one pass over data.inputs (weights quantized, activations observed)."""
    qs = [a for a in data.act_quantizers() if a.needs_calibration] if quantizers is None else quantizers
    if not qs:
        return
    for a in qs:
        a.observing = True
    for i in range(len(data)):
        for a in qs:
            a.obs_mask = data.masks[i]
        data.forward(i)
    for a in qs:
        a.obs_mask = None
        a.finish_observing()


@torch.no_grad()
def share_unit_quantizers(data: BlockData) -> list[list[str]]:
    """Trace batch 0 through the unit: QuantLinears that receive the same input tensor get ONE shared activation
    quantizer (q|k|v, gate|up). Returns the groups of keys that share one."""
    qls = dict(data.qlinears())
    groups = [g for g in same_input_groups(qls, lambda: data.forward(0)) if len(g) > 1]
    for g in groups:
        share_act_quantizer([qls[k] for k in g])
    return groups


def _units(blocks: list, units) -> list[list]:
    """Group scoped blocks into units (consecutive, one part each). units: None or lists of block keys."""
    if units is None:
        return [[b] for b in blocks]
    by_key = {b.key: b for b in blocks}
    out, seen = [], []
    for u in units:
        missing = [k for k in u if k not in by_key]
        if missing or not u:
            raise QVLMError(f"unit {u} names blocks not in scope ({missing})", f"use keys from {list(by_key)}")
        ub = [by_key[k] for k in u]
        if len({b.part for b in ub}) != 1 or [b.index for b in ub] != list(range(ub[0].index, ub[0].index + len(ub))):
            raise QVLMError(f"unit {u} is not a run of consecutive blocks of one part",
                            "a unit may not span vision/projector/llm boundaries")
        out.append(ub)
        seen += u
    if seen != [b.key for b in blocks]:
        raise QVLMError("units must cover every scoped block once, in forward order",
                        f"blocks: {[b.key for b in blocks]}")
    return out


# ----------------------------------------------------------------------------------------------------- driver
UnitFn = Callable[[BlockData], dict]


def calibrate(model: nn.Module, processor, samples: list[dict], qcfg: QuantConfig, unit_fn: UnitFn | None, *,
              batch_size: int = 16, units: list[list[str]] | None = None, progress: bool = True,
              unit_iters: dict[str, int] | None = None) -> dict[str, dict]:
    """Quantize the scoped blocks of `model` in place, unit by unit (module docstring). Returns {unit key: stats}.

    unit_fn(data) runs the method on one unit and returns a stats dict (or None); None = RTN (only the driver's
    static range calibration + freeze)."""
    if not samples:
        raise QVLMError("empty calibration set (0 samples)", "pass --calib N with N >= 1")
    check_model(model, qcfg)
    batches = calib_batches(samples, processor, batch_size)
    img_id = image_token_id(model)
    blocks = llava.blocks(model, qcfg.scope)
    groups = _units(blocks, units)
    # FP stream: each part's first-block input, captured before anything is modified
    first = {}
    for g in groups:
        first.setdefault(g[0].part, g[0])
    fp_caps = {part: capture_inputs(model, batches, b.module) for part, b in first.items()}
    stats, state = {}, None
    bar = tqdm(groups, desc="calibrate", disable=not progress, leave=False)
    for g in bar:
        key = g[0].key if len(g) == 1 else f"{g[0].part}.{g[0].index}-{g[-1].index}"
        bar.set_postfix_str(key)
        if state is None or state["part"] != g[0].part:           # entering a part: capture along the quantized path
            q_caps = capture_inputs(model, batches, g[0].module)
            f_caps = fp_caps.pop(g[0].part)                    # the FP stream continues through the FP unit copies
            rows = [i for i, (q, f) in enumerate(zip(q_caps, f_caps)) if q is not None and f is not None]
            if not rows:
                raise QVLMError(f"no calibration sample reaches block {key} (e.g. only text-only samples for the "
                                "vision tower)",
                                "calibrate with samples that have images, or drop that part from --scope")
            state = dict(part=g[0].part,
                         inputs=[q_caps[i][0][0] for i in rows], fp_inputs=[f_caps[i][0][0] for i in rows],
                         args=[q_caps[i][0][1:] for i in rows], kwargs=[q_caps[i][1] for i in rows],
                         masks=[token_masks(batches[i], q_caps[i][0][0], img_id, g[0].part)[0] for i in rows],
                         image_masks=[token_masks(batches[i], q_caps[i][0][0], img_id, g[0].part)[1] for i in rows])
            _check_finite(state["inputs"] + state["fp_inputs"], "entering", key)
        fp_blocks = [copy.deepcopy(b.module) for b in g]
        for m in fp_blocks:
            m.requires_grad_(False)
        data = BlockData(blocks=g, fp_blocks=fp_blocks, inputs=state["inputs"], fp_inputs=state["fp_inputs"],
                         targets=[], args=state["args"], kwargs=state["kwargs"], masks=state["masks"],
                         image_masks=state["image_masks"],
                         iters=(unit_iters or {}).get(key))
        with torch.no_grad():
            data.targets = [data.forward(i, fp=True) for i in range(len(data))]
        _check_finite(data.targets, "in the FP output of", key)
        for b in g:
            quantize_module(b.module, qcfg)
        share_unit_quantizers(data)                    # one activation quantizer per input tensor
        grad_flags = {id(p): p.requires_grad for b in g for p in b.module.parameters()}
        for b in g:
            b.module.requires_grad_(False)             # methods learn only the tensors they create
        with torch.enable_grad():
            stats[key] = dict(unit_fn(data) or {}) if unit_fn is not None else {}
        for b in g:
            for p in b.module.parameters():
                p.requires_grad_(grad_flags.get(id(p), False))
        observe_act_ranges(data)
        for b in g:
            for _, m in quant_linears(b.module):
                m.freeze()
        with torch.no_grad():
            outs = [data.forward(i) for i in range(len(data))]
        _check_finite(outs, "in the quantized output of", key)
        state.update(inputs=outs, fp_inputs=data.targets)
        del data, fp_blocks
    return stats


# ------------------------------------------------------------------------------------------ running blocks
def group_forward(modules: list[nn.Module], outputs: list[nn.Module], args, kwargs):
    """forward(x, i) -> (B, T, sum C_out): run `modules` (consecutive transformer layers) on x with batch i's
    args/kwargs and return the concatenated outputs of the `outputs` linears, stopping the forward there."""
    def forward(x, i):
        got = {}

        def hook(mod, _inp, out):
            got[id(mod)] = out
            if len(got) == len(outputs):
                raise Stop

        handles = [m.register_forward_hook(hook) for m in outputs]
        try:
            with contextlib.suppress(Stop):
                for m in modules:
                    x = call_block(m, x, args[i], kwargs[i])
        finally:
            for h in handles:
                h.remove()
        assert len(got) == len(outputs), "the block's output layers did not all run"
        return torch.cat([got[id(m)] for m in outputs], dim=-1)      # (B, T, sum C_out)
    return forward


@torch.no_grad()
def layer_inputs(data: BlockData, layer: int, fp: bool = False) -> list[torch.Tensor]:
    """Input of the unit's `layer`-th transformer layer per batch (quantized path, or FP path with fp=True)."""
    mods = data.fp_blocks if fp else data.modules
    out = []
    for i in range(len(data)):
        x = data.fp_inputs[i] if fp else data.inputs[i]
        for m in mods[:layer]:
            x = call_block(m, x, data.args[i], data.kwargs[i])
        out.append(x)
    return out
