"""Calibration plumbing shared by every stage: batches of TRAIN-split samples, forward hooks that read a layer's
input, and the token masks that keep padding out of every statistic.

    check_train_split(samples)        calibration never touches val / test (QVLMError otherwise)
    calib_batches(samples, processor) collated batches (CPU); images and text-only samples never mixed
    model_inputs(model, batch)        the tensors model.forward takes, on the model's device and dtype
    token_masks(batch, hidden, image_token_id, part) -> (valid, image), each shaped hidden.shape[:-1]
    InputTap({key: module}, fn)       forward pre-hooks calling fn(key, input) during a forward
    same_input_groups({key: m}, fwd)  keys whose modules receive the same input tensor object in fwd() (q|k|v)
    capture_inputs(model, batches, m) (args, kwargs) that module m receives in a real forward, aborted there
    call_block(block, x, args, kwargs) hidden states out of a transformer layer, tuple or tensor

Token masks: an LLM input (B, T, C) is aligned with `input_ids`; its valid tokens are `attention_mask == 1` and its
image tokens are `input_ids == config.image_token_id`. A vision-tower or projector input is not aligned with the
prompt: every row is a valid image token.

References: GPTQ `llama.py::llama_sequential` (the Catcher that aborts a forward at a layer).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .. import data as qdata
from ..errors import QVLMError
from ..models import llava
from .hadamard import rotate_input


class Stop(Exception):
    """Raised inside a hook to abort a forward once what was needed has been captured."""


def check_train_split(samples: list[dict]) -> None:
    """Calibration statistics and optimisation use the TRAIN split only (QVLMError otherwise)."""
    if not samples:
        raise QVLMError("empty calibration set (0 samples)", "pass at least one calibration sample (train split)")
    bad = {s.get("split") for s in samples} - {"train"}
    if bad:
        raise QVLMError(f"calibration samples from split(s) {sorted(map(str, bad))}",
                        "draw calibration data with qvlm.data.calibration_set (train split only)")


def calib_batches(samples: list[dict], processor, batch_size: int, with_answer: bool = False) -> list[dict]:
    """Collated calibration batches on the CPU (qvlm.data.collate; images and text-only never mixed)."""
    check_train_split(samples)
    return [qdata.collate(chunk, processor, with_answer=with_answer) for chunk in qdata.batches(samples, batch_size)]


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The tensors of a collated batch that the model's forward takes, on the model's device and dtype."""
    dev, dt = llava.model_device(model), llava.model_dtype(model)
    out = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask") if k in batch}
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"].to(dev, dt)
    return out


def image_token_id(model: nn.Module) -> int:
    """The image placeholder token id from the model config (never hard-coded)."""
    tid = getattr(model.config, "image_token_id", None)
    if tid is None:
        tid = getattr(model.config, "image_token_index", None)
    if tid is None:
        raise QVLMError("model config has no image_token_id", "use a llava-hf LlavaForConditionalGeneration checkpoint")
    return int(tid)


def token_masks(batch: dict, hidden: torch.Tensor, image_token: int, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, image) bool masks shaped hidden.shape[:-1] for an input of `part` (see the module docstring)."""
    if part == "llm":                                               # aligned with the prompt tokens
        ids, am = batch["input_ids"], batch["attention_mask"]
        assert tuple(am.shape) == tuple(hidden.shape[:-1]), \
            f"LLM input {tuple(hidden.shape)} does not align with input_ids {tuple(ids.shape)}"
        return am.bool().to(hidden.device), (ids == image_token).to(hidden.device)
    ones = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    return ones, ones                                             # vision / projector rows: image tokens only


class InputTap:
    """Forward pre-hooks that hand each watched module's input to `fn(key, x)` during a forward pass -- the input its
    weight multiplies, i.e. after the layer's online rotation when it has one (RotatedInputLinear, a rotated
    QuantLinear).

    With `raw=True` the module's input is handed over as it arrives (before any online rotation): the tensor that
    is in the forward graph, e.g. to retain its gradient (an orthonormal rotation keeps the gradient's norm).

    Use as a context manager; hooks are removed on exit even if the forward raises."""

    def __init__(self, modules: dict[str, nn.Module], fn, raw: bool = False):
        self.modules, self.fn, self.raw, self.handles = modules, fn, raw, []

    def _input(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x if self.raw else rotate_input(x, getattr(mod, "input_transform", None))

    def __enter__(self):
        for key, m in self.modules.items():
            self.handles.append(m.register_forward_pre_hook(
                lambda mod, args, key=key: self.fn(key, self._input(mod, args[0]))))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def same_input_groups(modules: dict[str, nn.Module], forward) -> list[list[str]]:
    """Run `forward()` once and group the keys of `modules` whose module received the SAME input tensor object
    (q|k|v, gate|up: one activation, one set of codes), each group in the dict's order of first calls; keys never
    called are left out. Only each module's first call counts, and the raw input is compared (not InputTap's rotated
    one, a new tensor per layer). Inputs are held by weak reference, so a long forward keeps no activations alive:
    a dead tensor cannot be the live one a later call receives."""
    groups: list[list[str]] = []
    reps: list[weakref.ref] = []                 # one live-or-dead reference per group: its first member's input
    done: set[str] = set()
    def keep(key):
        def hook(_mod, args):                    # returns None: a pre-hook's return value would replace the input
            if key in done:
                return
            done.add(key)
            x = args[0]
            gi = next((i for i, r in enumerate(reps) if r() is x), None)
            if gi is None:
                groups.append([key])
                reps.append(weakref.ref(x))
            else:
                groups[gi].append(key)
        return hook

    handles = [m.register_forward_pre_hook(keep(key)) for key, m in modules.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    order = {k: i for i, k in enumerate(modules)}
    return [sorted(g, key=order.__getitem__) for g in groups]


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: list[dict], module: nn.Module) -> list[tuple | None]:
    """(args, kwargs) that `module` receives in a real forward of each collated batch (None if it never runs, e.g.
    the vision tower on a text-only batch). The forward is aborted at the module, so later blocks never run."""
    got = []

    def hook(_mod, args, kwargs):
        got.append((args, dict(kwargs)))
        raise Stop

    out = []
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            got.clear()
            with contextlib.suppress(Stop):
                model(**model_inputs(model, b), use_cache=False)
            out.append(got[0] if got else None)
    finally:
        handle.remove()
    return out


def call_block(module: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """module(x, *args, **kwargs), returning the hidden states whether the block returns a tensor or a tuple."""
    out = module(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out
