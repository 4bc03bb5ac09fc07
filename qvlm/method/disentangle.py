"""Visual encoder optimization, VEO (paper Sec. 3.3, "disentangling cross-layer dependency"; Eq. 5 (R)).

The paper optimises the visual encoder so that the activations it produces for the LLM have LOWER entropy,
which weakens cross-layer dependency (Fig. 2: entropy tracks DED), so smaller blocks suffice:

    L_VEO = L_AR + eta * sum_k gamma_k * H~_k                                            (Eq. 5, reconstructed)

  L_AR     auto-regressive LM loss of the answer letter on calibration data (TRAIN split), nats.
  H~_k     a DIFFERENTIABLE surrogate of H(x_q^(k)), the entropy of LLM unit k's quantized input: a soft
           histogram over the quantization LEVELS. Each element's continuous level coordinate
           u = x / scale + zero_point (per-token scale, as the quantizer) is spread over the levels by a kernel:
             kernel="triangle" (default): linear interpolation between the two nearest levels (O(2) per element;
                 equals the hard histogram when u is on a level);
             kernel="gaussian": softmax(-(u - l)^2 / tau) over all K levels (-> the hard histogram as tau -> 0).
           p_l = mean weight of level l; H~ = -sum_l p_l log p_l (nats, <= log K).
  gamma_k  first-order approximation of the Jacobian coefficient the author describes (issue #18: "we use the
           first-order gradient as an approximation of the Jacobian matrix to assign coefficients for the LLaMA
           layers"): g_k = E_batch ||dL_AR / dx_k||_2, gamma_k = g_k / sum_j g_j (sums to 1, so the penalty is a
           weighted MEAN entropy in nats, on the same scale as L_AR, and eta is scale-free w.r.t. depth).
  trained  `encoder_params` (documented choice, the paper does not say): "layernorm" (default: LayerNorm affine
           of the vision tower; few parameters, cannot overfit 8-64 calibration samples), "layernorm+last" (plus
           every parameter of the last `n_last` vision layers that feed the projector), or "all".

Differences from the official code (docs §1.B5, §5.5): there the "VEO" is a constant 0.01 * mean(entropy)
added to every clip-ratio candidate's score, so it never changes the argmin, and CLIP is not quantized.

Search and apply are separate (R10): run_disentangle -> save_disentangle (trained parameters + config) ->
load_disentangle -> apply_disentangle(model, artifact).

References: soft/kernel histograms (differentiable binning, e.g. Ustinova & Lempitsky 2016);
docs/qvlm-method.md §1.A.6 and issue #18.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..analysis.entropy import act_step
from ..config import QuantConfig
from ..core.hooks import InputTap, calib_batches, check_train_split, image_token_id, model_inputs, token_masks
from ..core.quant import check_bits, qrange
from ..core.units import find_units
from ..errors import QVLMError
from ..models import llava
from ..utils import load_artifact, save_artifact

KERNELS = ("triangle", "gaussian")
ENCODER_PARAMS = ("layernorm", "layernorm+last", "all")


@dataclass(frozen=True)
class VEOConfig:
    eta: float = 0.1               # weight of the entropy term (Fig. 3(b)); L_AR and the weighted mean H are both nats
    iters: int = 50                # optimizer steps over calibration batches (cycled)
    lr: float = 1e-3               # Adam step; LayerNorm affine tolerates 1e-3, use ~1e-5 for "all"
    encoder_params: str = "layernorm"   # which vision-tower parameters train (see module doc)
    n_last: int = 1                # with "layernorm+last": how many of the last USED vision layers train fully
    kernel: str = "triangle"       # soft histogram kernel of H~
    tau: float = 0.5               # gaussian kernel temperature (in squared levels)
    tokens: str = "all"            # entropy over "all" valid LLM tokens or "image" positions only
    batch_size: int = 8

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise QVLMError(f"unknown entropy kernel {self.kernel!r}", f"use one of {', '.join(KERNELS)}")
        if self.encoder_params not in ENCODER_PARAMS:
            raise QVLMError(f"unknown encoder_params {self.encoder_params!r}",
                            f"use one of {', '.join(ENCODER_PARAMS)}")
        if self.tokens not in ("all", "image"):
            raise QVLMError(f"unknown token set {self.tokens!r}", "use 'all' or 'image'")
        if self.eta < 0 or self.iters < 0:
            raise QVLMError(f"eta={self.eta}, iters={self.iters} must be >= 0", "pass non-negative values")


# ------------------------------------------------------------------------------------------- surrogate H~
def soft_level_probs(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool,
                     kernel: str = "triangle", tau: float = 0.5) -> torch.Tensor:
    """Differentiable level distribution (K,) of x (..., C) under step `scale` (broadcastable, e.g. (..., 1))."""
    qmin, qmax = qrange(bits, symmetric)
    u = (x / scale + zero_point).clamp(qmin, qmax).reshape(-1) - qmin      # (M,) level coordinate in [0, K-1]
    k = qmax - qmin + 1
    if kernel == "triangle":
        lo = u.detach().floor().clamp(max=k - 2)                            # (M,) left level; u - lo in [0, 1]
        frac = u - lo
        hist = torch.zeros(k, dtype=u.dtype, device=u.device)
        hist = hist.index_add(0, lo.long(), 1 - frac).index_add(0, lo.long() + 1, frac)
    elif kernel == "gaussian":
        levels = torch.arange(k, dtype=u.dtype, device=u.device)
        hist = torch.softmax(-(u[:, None] - levels) ** 2 / tau, dim=1).sum(0)   # (K,)
    else:
        raise QVLMError(f"unknown entropy kernel {kernel!r}", f"use one of {', '.join(KERNELS)}")
    return hist / u.numel()


def soft_entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum p log p (nats) of a probability vector, differentiable (0 log 0 := 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


def surrogate_entropy(x: torch.Tensor, qcfg: QuantConfig, bits: int, kernel: str = "triangle",
                      tau: float = 0.5) -> torch.Tensor:
    """H~(x_q) of rows x (N, C) under qcfg's activation quantizer (per-token scale, differentiable)."""
    scale, zp = act_step(x, qcfg, bits)
    return soft_entropy(soft_level_probs(x.float(), scale, zp, bits, qcfg.a_symmetric, kernel, tau))


# ------------------------------------------------------------------------------------------- parameters
def used_vision_layers(model: nn.Module) -> int:
    """How many vision layers feed the projector (config.vision_feature_layer: -1 = all, -2 = all but the last)."""
    n = len(llava.parts(model)["vision"].blocks)
    fl = model.config.vision_feature_layer
    fl = max(fl) if isinstance(fl, (list, tuple)) else fl
    return n + 1 + fl if fl < 0 else fl


def encoder_parameters(model: nn.Module, which: str = "layernorm", n_last: int = 1) -> dict[str, nn.Parameter]:
    """{qualified name: parameter} of the vision tower that VEO trains (see the module doc)."""
    if which not in ENCODER_PARAMS:
        raise QVLMError(f"unknown encoder_params {which!r}", f"use one of {', '.join(ENCODER_PARAMS)}")
    vision = llava.parts(model)["vision"]
    names = {id(p): n for n, p in model.named_parameters()}
    chosen: list[nn.Parameter] = []
    if which == "all":
        chosen = list(vision.module.parameters())
    else:
        chosen = [p for m in vision.module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
        if which == "layernorm+last":
            n_used = used_vision_layers(model)
            for blk in vision.blocks[max(0, n_used - n_last):n_used]:
                chosen += list(blk.parameters())
    out: dict[str, nn.Parameter] = {}
    for p in chosen:
        out.setdefault(names[id(p)], p)
    return out


# ------------------------------------------------------------------------------------------- the loss
class LLMInputs:
    """Forward pre-hooks on the first linear of every LLM unit: keep its input (with its graph) per forward."""

    def __init__(self, model: nn.Module, processor, sample: dict, scope=("llm",)):
        self.units = [u for u in find_units(model, processor, sample, scope)]
        infos = {i.key: i for i in llava.linear_layers(model, scope)}
        self.modules = {u.keys[0]: infos[u.keys[0]].module for u in self.units}
        self.x: dict[str, torch.Tensor] = {}

    def tap(self, retain_grad: bool = False):
        def keep(key, x):
            if retain_grad and x.requires_grad:
                x.retain_grad()
            self.x[key] = x
        self.x = {}
        return InputTap(self.modules, keep)


def veo_loss(model: nn.Module, batch: dict, taps: LLMInputs, gamma: dict[str, float], cfg: VEOConfig,
             qcfg: QuantConfig, bits: int) -> tuple[torch.Tensor, dict]:
    """L_VEO = L_AR + eta * sum_k gamma_k H~_k on one batch (with labels); returns (loss, parts for logging)."""
    with taps.tap():
        out = model(**model_inputs(model, batch), labels=batch["labels"].to(llava.model_device(model)))
    img_id = image_token_id(model)
    h = {}
    for key, x in taps.x.items():
        valid, image = (m.reshape(-1) for m in token_masks(batch, x, img_id, "llm"))
        rows = valid & image if cfg.tokens == "image" else valid
        if not rows.any():
            continue
        h[key] = surrogate_entropy(x.reshape(-1, x.shape[-1])[rows.to(x.device)], qcfg, bits, cfg.kernel, cfg.tau)
    penalty = sum((gamma[k] * h[k] for k in h), torch.zeros(()))        # weighted mean entropy (sum gamma = 1)
    loss = out.loss + cfg.eta * penalty
    return loss, dict(loss=float(loss.detach()), l_ar=float(out.loss.detach()), entropy=float(penalty.detach()))


def jacobian_gammas(model: nn.Module, batches: list[dict], taps: LLMInputs) -> dict[str, float]:
    """gamma_k = g_k / sum_j g_j with g_k = mean over batches of ||dL_AR / dx_k||_2 (first-order Jacobian proxy)."""
    g = {k: 0.0 for k in taps.modules}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        with taps.tap(retain_grad=True):
            out = model(**model_inputs(model, batch), labels=batch["labels"].to(llava.model_device(model)))
        out.loss.backward()
        for k, x in taps.x.items():
            if x.grad is None:
                raise QVLMError(f"no gradient reached the input of {k}", "L_AR must depend on every LLM layer")
            g[k] += float(x.grad.norm()) / len(batches)
    model.zero_grad(set_to_none=True)
    total = sum(g.values())
    if not total > 0:
        raise QVLMError("dL_AR/dx is zero at every LLM layer", "check that the calibration batch has answer labels")
    return {k: v / total for k, v in g.items()}


# ------------------------------------------------------------------------------------------- search / apply
@dataclass
class VEOResult:
    """Trained encoder parameters (the artifact), gammas, and the loss history (per step)."""
    config: dict
    params: dict                                  # {name: tensor} trained vision-tower parameters
    gamma: dict                                   # {LLM unit key: gamma_k}
    before: dict = field(default_factory=dict)    # mean {"loss", "l_ar", "entropy"} over all calibration batches
    after: dict = field(default_factory=dict)     # the same after the last step
    history: list = field(default_factory=list)   # per step, on that step's batch, before the update


def run_disentangle(model: nn.Module, processor, samples: list[dict], cfg: VEOConfig | None = None,
                    qcfg: QuantConfig | None = None, bits: int = 0, seed: int = 0,
                    meta: dict | None = None) -> VEOResult:
    """Optimise the chosen vision-tower parameters IN PLACE on L_VEO; returns the artifact (R10: search step)."""
    cfg, qcfg = cfg or VEOConfig(), qcfg or QuantConfig()
    bits = check_bits(bits or qcfg.a_bits, "bits")
    check_train_split(samples)
    torch.manual_seed(seed)
    batches = [b for b in calib_batches(samples, processor, cfg.batch_size, with_answer=True) if "pixel_values" in b]
    if not batches:
        raise QVLMError("no calibration sample has an image", "VEO trains the vision tower: use samples with images")
    taps = LLMInputs(model, processor, samples[0])
    params = encoder_parameters(model, cfg.encoder_params, cfg.n_last)
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        model.eval()                                                      # no dropout: a deterministic objective
        gamma = jacobian_gammas(model, batches, taps)
        opt = torch.optim.Adam(params.values(), lr=cfg.lr)
        history = []
        with torch.no_grad():
            before = evaluate_veo(model, batches, taps, gamma, cfg, qcfg, bits)
        for it in range(cfg.iters):
            loss, log = veo_loss(model, batches[it % len(batches)], taps, gamma, cfg, qcfg, bits)
            history.append(log)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = evaluate_veo(model, batches, taps, gamma, cfg, qcfg, bits)
    finally:
        for p, rg in frozen.items():
            p.requires_grad_(rg)
        model.train(was_training)
    config = dict(asdict(cfg), bits=bits, seed=seed, n_calib=len(samples), **(meta or {}))
    return VEOResult(config, {n: p.detach().clone() for n, p in params.items()}, gamma, before, after, history)


def evaluate_veo(model, batches, taps, gamma, cfg, qcfg, bits) -> dict:
    """Mean L_VEO, L_AR and weighted entropy over all calibration batches (no update)."""
    logs = [veo_loss(model, b, taps, gamma, cfg, qcfg, bits)[1] for b in batches]
    return {k: sum(lg[k] for lg in logs) / len(logs) for k in logs[0]}


def save_disentangle(res: VEOResult, path) -> Path:
    """Write `res` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("veo", res, path)


def load_disentangle(path) -> VEOResult:
    """Inverse of save_disentangle."""
    return load_artifact("veo", VEOResult, path, "qvlm.disentangle.save_disentangle")


@torch.no_grad()
def apply_disentangle(model: nn.Module, res: VEOResult) -> nn.Module:
    """Copy the trained vision-tower parameters into `model` (in place) and return it."""
    own = dict(model.named_parameters())
    missing = [n for n in res.params if n not in own]
    if missing:
        raise QVLMError(f"VEO artifact names {len(missing)} parameters this model lacks (first: {missing[0]})",
                        "apply it to the model it was trained on")
    for n, t in res.params.items():
        if own[n].shape != t.shape:
            raise QVLMError(f"VEO parameter {n} has shape {tuple(t.shape)}, model has {tuple(own[n].shape)}",
                            "apply it to the model it was trained on")
        own[n].copy_(t)
    return model


def summary(res: VEOResult) -> dict:
    """Before/after of the VEO objective over all calibration batches, plus the trained parameter count."""
    out = {f"{k}_{w}": v for w, d in (("before", res.before), ("after", res.after)) for k, v in d.items()}
    return out | dict(n_params=int(sum(t.numel() for t in res.params.values())),
                      gamma_max=max(res.gamma.values()) if res.gamma else math.nan)
