"""Visual encoder optimization, VEO (paper Sec. 3.3, "disentangling cross-layer dependency"; Eq. 5).

The paper optimises the visual encoder so that the activations it produces for the LLM have LOWER entropy, which
weakens cross-layer dependency (Fig. 2: entropy tracks DED), so finer blocks suffice:

    L_VEO = L_AR + eta * sum_k gamma_k * H~_k                                                  (Eq. 5)

  L_AR     auto-regressive loss of the answer the FP model itself gives (its greedy next token at the answer
           position): no answer labels are used, only the model's own outputs on calibration prompts (TRAIN
           split). KL(p_FP || p_VEO) at that position is reported beside it, as the drift from the FP model.
           `anchor` "kl" (beyond the paper) optimises that KL in place of L_AR: it is zero at the start and its
           minimum is the FP model itself, where cross-entropy to the greedy token keeps pulling the answer
           distribution sharper (measured on smol: L_AR alone, eta 0, costs 4.5 points of FP val accuracy).
  H~_k     a differentiable surrogate of H(x_q^(k)), the entropy of the QUANTIZED input of LLM unit k (the codes
           the a_bits per-token quantizer produces): a soft histogram over quantization levels. Each element's
           level coordinate u = x / scale + zero_point (per-token scale, as the quantizer) is spread over the two
           nearest levels (kernel "triangle": equals the hard histogram when u is on a level) or over all levels
           by a Gaussian (kernel "gaussian", -> the hard histogram as tau -> 0); H~ = -sum_l p_l log p_l (nats).
           `tokens` selects the positions: "image" (default: the positions the encoder writes into) or "all".
  gamma_k  the first-order approximation of the Jacobian coefficient the authors describe: g_k = E ||dL_AR/dx_k||,
           gamma_k = g_k / sum_j g_j (sums to 1: the penalty is a weighted MEAN entropy, in nats).
  eta      eta_mode "relative" (default): the entropy weight is eta * ||grad L_AR|| / ||grad H||, both gradients
           w.r.t. the trained encoder parameters on the first batch, so eta = 1 gives the two terms equal pull
           (an absolute eta of 0.1 made the entropy gradient ~100x weaker than L_AR's); "absolute": eta as is.
           Both gradient norms are recorded. With anchor "kl" the scale is still L_AR's gradient (KL's is zero
           at the start), so one eta means the same entropy pull under both anchors.
  trained  `encoder_params`: "layernorm" (default: the vision tower's LayerNorm affine parameters; few, hard to
           overfit 8-64 calibration samples), "layernorm+last" (+ every parameter of the last `n_last` vision
           layers that feed the projector), or "all".

The FP model is never modified: VEO trains a deep copy and returns the new encoder's parameters (an artifact that
`apply_disentangle` copies into a model). A guard keeps VEO honest: `check_guard` compares the FP accuracy with
and without the new encoder on VAL samples; if it falls by more than `guard` (0.3 points by default) the caller
reverts (qvlm.method.pipeline does, and records it).

Differences from the official code (docs/method.md): there the "VEO" is a constant 0.01 * mean(entropy) added to
every clip-ratio candidate's score, so it never changes the argmin, and CLIP is not quantized.

References: soft histograms (differentiable binning, e.g. Ustinova & Lempitsky 2016).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..analysis.entropy import act_step, run_entropy
from ..config import QuantConfig
from ..core.hooks import InputTap, calib_batches, check_train_split, image_token_id, model_inputs, token_masks
from ..core.quant import check_bits, qrange
from ..core.units import find_units
from ..errors import QVLMError
from ..evaluate import evaluate
from ..models import llava
from ..utils import load_artifact, save_artifact

KERNELS = ("triangle", "gaussian")
ENCODER_PARAMS = ("layernorm", "layernorm+last", "all")
ETA_MODES = ("relative", "absolute")
ANCHORS = {"ar": "l_ar", "kl": "kl"}           # the anchor's name -> its term in veo_terms
TOKENS = ("image", "all")


@dataclass(frozen=True)
class VEOConfig:
    eta: float = 1.0               # entropy weight (Fig. 3(b)); with eta_mode "relative", 1 = equal gradient pull
    eta_mode: str = "relative"     # "relative": eta x ||grad L_AR|| / ||grad H|| at the first step | "absolute"
    anchor: str = "ar"             # the term that keeps the encoder's function: "ar" L_AR (Eq. 5) | "kl" KL to FP
    iters: int = 50                # optimizer steps over calibration batches (cycled)
    lr: float = 1e-3               # Adam step; LayerNorm affine tolerates 1e-3, use ~1e-5 for "all"
    encoder_params: str = "layernorm"   # which vision-tower parameters train (see module doc)
    n_last: int = 1                # with "layernorm+last": how many of the last USED vision layers train fully
    kernel: str = "triangle"       # soft histogram kernel of H~
    tau: float = 0.5               # gaussian kernel temperature (in squared levels)
    tokens: str = "image"          # entropy over LLM "image" positions (what the encoder writes) or "all" tokens
    guard: float = 0.003           # largest FP accuracy drop on val (a fraction: 0.003 = 0.3 points) VEO may cost
    batch_size: int = 8

    def __post_init__(self):
        for name, value, allowed in (("kernel", self.kernel, KERNELS), ("encoder_params", self.encoder_params,
                                     ENCODER_PARAMS), ("eta_mode", self.eta_mode, ETA_MODES),
                                     ("tokens", self.tokens, TOKENS), ("anchor", self.anchor, tuple(ANCHORS))):
            if value not in allowed:
                raise QVLMError(f"unknown VEO {name} {value!r}", f"use one of {', '.join(allowed)}")
        if self.eta < 0 or self.iters < 0 or self.guard < 0:
            raise QVLMError(f"eta={self.eta}, iters={self.iters}, guard={self.guard} must be >= 0",
                            "pass non-negative values")


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
    scale, zero_point = act_step(x, qcfg, bits)
    return soft_entropy(soft_level_probs(x.float(), scale, zero_point, bits, qcfg.a_symmetric, kernel, tau))


# ------------------------------------------------------------------------------------------- parameters
def used_vision_layers(model: nn.Module) -> int:
    """How many vision layers feed the projector (config.vision_feature_layer: -1 = all, -2 = all but the last)."""
    n = len(llava.parts(model)["vision"].blocks)
    fl = model.config.vision_feature_layer
    fl = max(fl) if isinstance(fl, (list, tuple)) else fl
    return n + 1 + fl if fl < 0 else fl


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")


def encoder_parameters(model: nn.Module, which: str = "layernorm", n_last: int = 1) -> dict[str, nn.Parameter]:
    """{qualified name: parameter} of the vision tower that VEO trains (see the module doc)."""
    if which not in ENCODER_PARAMS:
        raise QVLMError(f"unknown encoder_params {which!r}", f"use one of {', '.join(ENCODER_PARAMS)}")
    vision = llava.parts(model)["vision"]
    names = {id(p): n for n, p in model.named_parameters()}
    if which == "all":
        chosen = list(vision.module.parameters())
    else:
        chosen = [p for m in vision.module.modules() if _is_norm(m) for p in m.parameters()]
        if which == "layernorm+last":
            n_used = used_vision_layers(model)
            for blk in vision.blocks[max(0, n_used - n_last):n_used]:
                chosen += list(blk.parameters())
    out: dict[str, nn.Parameter] = {}
    for p in chosen:
        out.setdefault(names[id(p)], p)
    if not out:
        raise QVLMError(f"the vision tower has no {which} parameters to train", "pass encoder_params='all'")
    return out


# ------------------------------------------------------------------------------------------- the loss
class LLMInputs:
    """Forward pre-hooks on the first linear of every LLM unit: keep its input (with its graph) per forward."""

    def __init__(self, model: nn.Module, processor, sample: dict):
        self.units = find_units(model, processor, sample, ("llm",))
        infos = {i.key: i for i in llava.linear_layers(model, ("llm",))}
        self.modules = {u.keys[0]: infos[u.keys[0]].module for u in self.units}
        self.x: dict[str, torch.Tensor] = {}

    def tap(self, retain_grad: bool = False):
        """Keep each unit's input: the quantizer's input (after an online rotation), or with `retain_grad` the raw
        input that is in the graph, its gradient retained (||dL/dx|| is the same before and after an orthonormal
        rotation, so jacobian_gammas reads it there)."""
        def keep(key, x):
            if retain_grad and x.requires_grad:
                x.retain_grad()
            self.x[key] = x
        self.x = {}
        return InputTap(self.modules, keep, raw=retain_grad)


@torch.no_grad()
def teacher_targets(model: nn.Module, processor, batches: list[dict]) -> list[dict]:
    """Per batch, the FP model's own answer: its greedy next token and log-probabilities at the answer position
    (the pseudo-labels of L_AR and the reference of the KL)."""
    out = []
    for b in batches:
        logits = model(**model_inputs(model, b)).logits                      # (B, T, V)
        last = logits[torch.arange(len(logits)), b["last"].to(logits.device)].float()    # (B, V)
        out.append(dict(token=last.argmax(-1), logp=last.log_softmax(-1)))
    return out


def veo_terms(model: nn.Module, batch: dict, teacher: dict, taps: LLMInputs, gamma: dict[str, float],
              cfg: VEOConfig, qcfg: QuantConfig, bits: int) -> dict:
    """L_AR (pseudo-labels), KL to FP, and the gamma-weighted surrogate entropy of one batch (tensors)."""
    with taps.tap():
        logits = model(**model_inputs(model, batch)).logits
    last = logits[torch.arange(len(logits)), batch["last"].to(logits.device)].float()   # (B, V)
    logp = last.log_softmax(-1)
    l_ar = -logp.gather(1, teacher["token"][:, None]).mean()
    kl = (teacher["logp"].exp() * (teacher["logp"] - logp)).sum(-1).mean()
    img_id = image_token_id(model)
    h, crest = {}, {}
    for key, x in taps.x.items():
        valid, image = (m.reshape(-1) for m in token_masks(batch, x, img_id, "llm"))
        rows = valid & image if cfg.tokens == "image" else valid
        if rows.any():
            xr = x.reshape(-1, x.shape[-1])[rows]
            h[key] = surrogate_entropy(xr, qcfg, bits, cfg.kernel, cfg.tau)
            crest[key] = log_crest(xr.detach())
    entropy = sum((gamma[k] * h[k] for k in h), torch.zeros(()))
    return dict(l_ar=l_ar, kl=kl, entropy=entropy, crest=sum((gamma[k] * crest[k] for k in crest), torch.zeros(())))


def log_crest(x: torch.Tensor) -> torch.Tensor:
    """Mean over rows (tokens) of log(absmax / rms): how peaked each token is. A per-token quantizer's step is
    absmax / qmax, so its code entropy is about log(rms / step) + const = log qmax - log_crest + const: entropy can
    fall by making tokens MORE peaked (coarser steps for the bulk), which is the opposite of what helps quantization.
    VEO reports it (crest_before / crest_after) so a lower entropy can be told apart from a more peaked input."""
    x = x.float()
    return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt().clamp_min(1e-12)).log().mean()


def jacobian_gammas(model: nn.Module, batches: list[dict], teachers: list[dict], taps: LLMInputs) -> dict[str, float]:
    """gamma_k = g_k / sum_j g_j with g_k = mean over batches of ||dL_AR / dx_k||_2 (first-order Jacobian proxy)."""
    g = {k: 0.0 for k in taps.modules}
    for batch, teacher in zip(batches, teachers):
        model.zero_grad(set_to_none=True)
        with taps.tap(retain_grad=True):
            logits = model(**model_inputs(model, batch)).logits
        last = logits[torch.arange(len(logits)), batch["last"].to(logits.device)].float()
        (-last.log_softmax(-1).gather(1, teacher["token"][:, None]).mean()).backward()
        for k, x in taps.x.items():
            if x.grad is None:
                raise QVLMError(f"no gradient reached the input of {k}", "L_AR must depend on every LLM layer")
            g[k] += float(x.grad.norm()) / len(batches)
    model.zero_grad(set_to_none=True)
    total = sum(g.values())
    if not total > 0:
        raise QVLMError("dL_AR/dx is zero at every LLM layer", "check the calibration prompts reach the answer position")
    return {k: v / total for k, v in g.items()}


def _grad_norm(loss: torch.Tensor, params: list[nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


# ------------------------------------------------------------------------------------------- search / apply
@dataclass
class VEOResult:
    """Trained encoder parameters (the artifact), gammas, the loss history and what VEO did to the entropy."""
    config: dict
    params: dict                                  # {name: tensor} trained vision-tower parameters
    gamma: dict                                   # {LLM unit key: gamma_k}
    before: dict = field(default_factory=dict)    # mean l_ar / kl / entropy (surrogate) / crest over calib. batches
    after: dict = field(default_factory=dict)
    history: list = field(default_factory=list)   # per step, on that step's batch, before the update
    grad_norms: dict = field(default_factory=dict)  # ||grad L_AR||, ||grad H|| at the first step; eta_effective
    hard_entropy: dict = field(default_factory=dict)  # gamma-weighted hard code entropy, image / all tokens, before / after
    guard: dict = field(default_factory=dict)     # FP val accuracy before / after, n, reverted


def run_disentangle(model: nn.Module, processor, samples: list[dict], cfg: VEOConfig | None = None,
                    qcfg: QuantConfig | None = None, bits: int = 0, seed: int = 0,
                    meta: dict | None = None) -> VEOResult:
    """Optimise a COPY of the model's chosen vision-tower parameters on L_VEO; `model` is not modified. Returns the
    artifact (the new parameters; `apply_disentangle` puts them into a model)."""
    cfg, qcfg = cfg or VEOConfig(), qcfg or QuantConfig()
    bits = check_bits(bits or qcfg.a_bits, "bits")
    check_train_split(samples)
    torch.manual_seed(seed)
    batches = [b for b in calib_batches(samples, processor, cfg.batch_size) if "pixel_values" in b]
    if not batches:
        raise QVLMError("no calibration sample has an image", "VEO trains the vision tower: use samples with images")
    teachers = teacher_targets(model, processor, batches)
    student = copy.deepcopy(model).eval()                                 # eval: no dropout, deterministic
    student.requires_grad_(False)
    taps = LLMInputs(student, processor, samples[0])
    params = encoder_parameters(student, cfg.encoder_params, cfg.n_last)
    for p in params.values():
        p.requires_grad_(True)
    gamma = jacobian_gammas(student, batches, teachers, taps)
    plist = list(params.values())
    t0 = veo_terms(student, batches[0], teachers[0], taps, gamma, cfg, qcfg, bits)
    g_ar, g_h = _grad_norm(t0["l_ar"], plist), _grad_norm(t0["entropy"], plist)
    eta = cfg.eta * (g_ar / g_h if cfg.eta_mode == "relative" and g_h > 0 else 1.0)
    opt = torch.optim.Adam(plist, lr=cfg.lr)
    before, history = evaluate_veo(student, batches, teachers, taps, gamma, cfg, qcfg, bits), []
    h_before = hard_entropy(student, processor, samples, qcfg, bits, gamma, cfg.batch_size)
    for it in range(cfg.iters):
        t = veo_terms(student, batches[it % len(batches)], teachers[it % len(batches)], taps, gamma, cfg, qcfg, bits)
        loss = t[ANCHORS[cfg.anchor]] + eta * t["entropy"]
        history.append(dict(loss=float(loss.detach()), **{k: float(v.detach()) for k, v in t.items()}))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = evaluate_veo(student, batches, teachers, taps, gamma, cfg, qcfg, bits)
    h_after = hard_entropy(student, processor, samples, qcfg, bits, gamma, cfg.batch_size)
    config = dict(asdict(cfg), bits=bits, seed=seed, n_calib=len(samples), **(meta or {}))
    return VEOResult(config, {n: p.detach().clone() for n, p in params.items()}, gamma, before, after, history,
                     grad_norms=dict(l_ar=g_ar, entropy=g_h, eta_effective=eta),
                     hard_entropy={f"{k}_before": v for k, v in h_before.items()}
                     | {f"{k}_after": v for k, v in h_after.items()})


@torch.no_grad()
def evaluate_veo(model, batches, teachers, taps, gamma, cfg, qcfg, bits) -> dict:
    """Mean L_AR, KL to FP and weighted surrogate entropy over all calibration batches (no update)."""
    logs = [{k: float(v) for k, v in veo_terms(model, b, t, taps, gamma, cfg, qcfg, bits).items()}
            for b, t in zip(batches, teachers)]
    return {k: sum(lg[k] for lg in logs) / len(logs) for k in logs[0]}


@torch.no_grad()
def hard_entropy(model, processor, samples, qcfg: QuantConfig, bits: int, gamma: dict, batch_size: int) -> dict:
    """The gamma-weighted mean HARD code entropy of the LLM units' quantized inputs (what VEO targets; nats),
    on image positions and on all tokens."""
    st = run_entropy(model, processor, samples, qcfg, bits=bits, batch_size=batch_size, scope=("llm",))
    out = {}
    for split in ("image", "all"):
        h = dict(zip([u[0] for u in st.units], st.unit_entropy(split)))
        out[f"H_{split}"] = sum(gamma[k] * h[k] for k in gamma if not math.isnan(h[k]))
    return out


def check_guard(model: nn.Module, processor, res: VEOResult, val: list[dict], batch_size: int = 32) -> dict:
    """FP accuracy on `val` (never test) with the model's encoder and with the VEO encoder; `reverted` is True when
    VEO costs more than res.config['guard']. Records the result in res.guard and returns it."""
    if any(s.get("split") != "val" for s in val):
        raise QVLMError("the VEO guard must be measured on the val split", "pass qvlm.data.load_split(..., 'val')")
    before = evaluate(model, processor, val, batch_size, progress=False)["accuracy"]
    after = evaluate(apply_disentangle(copy.deepcopy(model), res), processor, val, batch_size, progress=False)["accuracy"]
    res.guard = dict(fp_val_before=before, fp_val_after=after, n=len(val), max_drop=res.config["guard"],
                     reverted=bool(before - after > res.config["guard"] + 1e-12))
    return res.guard


def save_disentangle(res: VEOResult, path) -> Path:
    """Write `res` to `path` atomically (torch.save of plain types; the full config is inside)."""
    return save_artifact("veo", res, path)


def load_disentangle(path) -> VEOResult:
    """Inverse of save_disentangle."""
    return load_artifact("veo", VEOResult, path, "qvlm.method.disentangle.save_disentangle")


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
    """Before/after of the VEO objective and of the hard entropy it targets, gradient norms, guard, param count."""
    out = {f"{k}_{w}": v for w, d in (("before", res.before), ("after", res.after)) for k, v in d.items()}
    return out | dict(res.hard_entropy) | {f"grad_{k}": v for k, v in res.grad_norms.items()} | dict(res.guard) | dict(
        n_params=int(sum(t.numel() for t in res.params.values())),
        gamma_max=max(res.gamma.values()) if res.gamma else math.nan)
