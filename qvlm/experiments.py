"""The one experiment runner: FP model -> (transform) -> quantize with a method -> measure the cost -> evaluate
[-> deploy with the packed kernels and evaluate again]. The CLI, `bench/accuracy.py` and every notebook use it.

    rows = run(model, processor, "qvlm", "W4A4", seeds=[0, 1, 2], calib=CalibConfig(n_calib=64),
               eval=EvalConfig(n_eval=500), knobs=dict(iters=200))
    rows = grid(model, processor, ["rtn", "brecq", "qvlm"], ["W4A4", "W6A6"], seeds=[0, 1, 2], ...)

Each call quantizes a fresh deep copy of the FP model, so the FP model is never modified. One row per
(method, setting, seed), a flat dict:

    model, method, setting, transform, seed, knobs        what ran (knobs: the method's full config)
    accuracy, acc_<category>..., n_eval                   on the evaluation split (never used for calibration)
    wall_s, cpu_s, linear_fwd, linear_bwd, linear_passes, block_passes, peak_memory_bytes, peak_memory_kind
                                                          the search cost (qvlm.core.cost.measure)
    info                                                  the method's own record (blocks, partition, VEO ...)
    with deploy=True: packed_acc, agreement, layer_max_rel_err, scheme  (the packed model on the same samples),
                      with fused=True also fused_groups, fused_agreement  (its fused q|k|v / gate|up copy, first batch)

`summarize(rows)` (qvlm.report.stats) turns per-seed rows into mean +- std per (method, setting).
`export_row(...)` exports a quantized copy as compressed-tensors and compares the transformers reload with it.
`transform_outliers(...)` is the outlier picture (qvlm.analysis.outliers) of the FP model after each transform.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import pickle
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as qdata
from . import methods, transforms
from .analysis.outliers import activation_outliers
from .config import CalibConfig, EvalConfig, QuantConfig, parse_setting
from .core.checkpoint import FINGERPRINT_ATTR, fingerprint
from .core.cost import measure
from .core.qlinear import QuantLinear, quant_linears
from .deploy.layer import scheme
from .deploy.export import export_compressed_tensors, load_export
from .deploy.fuse import fuse_shared_inputs, shared_input_groups
from .deploy.pack import deploy as pack_model
from .deploy.pack import pack_layer
from .deploy.verify import LOCAL_ROWS, integer_accumulator, twin_check
from .errors import QVLMError
from .evaluate import evaluate, predict
from .models import llava
from .provenance import code_hash
from .utils import seed_everything


def eval_samples(cfg: EvalConfig) -> list[dict]:
    """The evaluation samples of `cfg` (the first n_eval of the split: a deterministic prefix)."""
    return qdata.load_split(cfg.dataset, cfg.split, limit=cfg.n_eval)


def setting_of(setting) -> QuantConfig:
    """A QuantConfig, or a setting label ('W4A4', 'W4A16G32') parsed by qvlm.config.parse_setting."""
    return setting if isinstance(setting, QuantConfig) else parse_setting(setting)


def method_knobs(method: str, knobs: dict | None) -> dict:
    """The subset of `knobs` that `method`'s config has (shared knobs such as `iters` or `budget` are offered to
    every method of a table; a method without that field ignores it). A knob no method of the run knows is
    rejected upstream (check_knobs)."""
    names = set(methods.get(method).knob_names())
    return {k: v for k, v in (knobs or {}).items() if k in names}


def check_knobs(method_names: list[str], knobs: dict | None) -> None:
    """Every knob must be an option of some registered method (QVLMError naming the misspelt one); a shared knob
    such as `iters` offered to a table of methods none of which uses it (METHODS=rtn) is ignored, not an error."""
    for n in method_names:
        methods.get(n)                                               # unknown method names fail here
    known = {k for m in methods.METHODS.values() for k in m.knob_names()}
    bad = sorted(set(knobs or {}) - known)
    if bad:
        raise QVLMError(f"no method has an option {bad[0]!r}",
                        f"the options are: {', '.join(sorted(known))}")


def _record_layers(model: nn.Module, names) -> tuple[list, dict]:
    """Forward hooks keeping LOCAL_ROWS rows of the named layers' (input, output), first call only."""
    local, hooks = {}, []
    for name in names:
        m = model.get_submodule(name)
        def hook(mod, a, y, name=name):
            if name not in local:
                x2 = a[0].detach().reshape(-1, a[0].shape[-1])[:LOCAL_ROWS].clone()
                local[name] = (x2, y.detach().reshape(-1, y.shape[-1])[:LOCAL_ROWS].clone())
        hooks.append(m.register_forward_hook(hook))
    return hooks, local


def resolved_transform(method: str, transform: str = "none") -> str:
    """The transform a run applies: `transform`, or the method's own when none is asked (quarot implies rotate)."""
    return transform if transform != "none" else methods.get(method).transform


def run_key(method: str, transform: str, setting, seed: int, config: dict, calib: dict | None, n_eval: int) -> tuple:
    """What decides a row's numbers: method, transform, setting, seed, the method's full config (as a dict),
    calibration and evaluation size. Two runs with equal keys compute the same row (same seed -> same numbers)."""
    return (method, resolved_transform(method, transform), setting_of(setting).setting, seed, repr(config),
            repr(calib), n_eval)


def planned_key(method: str, transform: str, setting, seed: int, knobs: dict | None, calib: CalibConfig | None,
                n_eval: int) -> tuple:
    """run_key of a run about to start (what run_one would record in its row)."""
    config = dataclasses.asdict(methods.get(method).make_config(**method_knobs(method, knobs)))
    return run_key(method, transform, setting, seed, config,
                   dataclasses.asdict(dataclasses.replace(calib or CalibConfig(), seed=seed)), n_eval)


def row_key(row: dict) -> tuple:
    """run_key of a finished row."""
    return run_key(row["method"], row["transform"], row["setting"], row["seed"], row["knobs"], row["info"]["calib"],
                   row["n_eval"])


ROW_CACHE_ENV = "QVLM_ROW_CACHE"   # a directory: grid() keeps every finished row there and reuses it (resume);
                                  # `python -m qvlm.reproduce --resume` and `bench.accuracy --resume` set it


class RowCache:
    """Finished grid rows on disk, so that a run of hours (notebook 05 on 2 cores) resumes where it was stopped
    instead of starting over. One file per row, written atomically: <root>/<code hash[:16]>/<key>.pkl, pickled (the
    row comes back exactly, tuples and all). The key is everything that decides the row's numbers: the code (package
    + kernels hash: any edit starts a new directory, so a row of other code is never reused), the FP model's
    fingerprint, torch's version and thread count, the evaluation config, the run's planned_key and the other
    run_one arguments (transform, calibration, deploy ...). A reused row carries `resumed_from` = its file."""

    def __init__(self, root, model: nn.Module):
        self.dir = self.code_dir(root)
        fp = fingerprint(model)
        self.model = hashlib.sha256(repr(sorted(fp.items())).encode()).hexdigest()

    @staticmethod
    def code_dir(root) -> Path:
        """Where the rows of the code as it is now live under `root`."""
        return Path(root) / code_hash()[:16]

    @classmethod
    def count(cls, root) -> int:
        """Rows stored under `root` for the code as it is now."""
        return len(list(cls.code_dir(root).glob("*.pkl")))

    def key(self, planned: tuple, eval: EvalConfig, run_kw: dict) -> str:
        what = (self.model, torch.__version__, torch.get_num_threads(), repr(eval), planned,
                sorted((k, repr(v)) for k, v in run_kw.items()))
        return hashlib.sha256(repr(what).encode()).hexdigest()[:32]

    def get(self, key: str) -> dict | None:
        path = self.dir / f"{key}.pkl"
        if not path.is_file():
            return None
        return dict(pickle.loads(path.read_bytes()), resumed_from=str(path))

    def put(self, key: str, row: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(pickle.dumps(row))
        os.replace(tmp, self.dir / f"{key}.pkl")                # atomic: a killed run leaves no half row


def row_cache(model: nn.Module, root=None) -> RowCache | None:
    """The cache grid() uses: `root`, else the directory in $QVLM_ROW_CACHE, else none."""
    root = root or os.environ.get(ROW_CACHE_ENV, "")
    return RowCache(root, model) if root else None


def run_one(model: nn.Module, processor, method: str, setting, seed: int = 0, *, calib: CalibConfig | None = None,
            eval: EvalConfig | None = None, knobs: dict | None = None, transform: str = "none",
            deploy: bool = False, model_name: str = "", samples: list[dict] | None = None,
            progress: bool = False, keep_model: bool = False, fused: bool = False) -> dict:
    """Quantize a copy of the FP `model` once (calibration seed `seed`) and evaluate it; returns one row (module
    docstring). `samples` overrides the evaluation samples; `keep_model` adds the quantized model as row['model'];
    `fused` (with deploy) also checks a fused q|k|v / gate|up copy of the packed model on the first batch."""
    qcfg = setting_of(setting)
    transform = resolved_transform(method, transform)
    calib = dataclasses.replace(calib or CalibConfig(), seed=seed)
    eval = eval or EvalConfig()
    samples = samples if samples is not None else eval_samples(eval)
    seed_everything(seed)
    m = copy.deepcopy(model)
    setattr(m, FINGERPRINT_ATTR, fingerprint(m))         # before the transform: a saved model stores what it changed
    tr = transforms.apply(m, processor, transform, calib, dataset=eval.dataset, qcfg=qcfg)
    block_types = tuple({type(b.module) for b in llava.blocks(m)})
    with measure(llava.model_device(m), QuantLinear, block_types) as cost:
        m, info = methods.quantize(m, processor, method, qcfg, calib, dataset=eval.dataset, progress=progress,
                                   **method_knobs(method, knobs))
    fields = methods.get(method).row_fields
    preds = predict(m, processor, samples, eval.batch_size, progress=progress)
    res = evaluate(m, processor, samples, predictions=preds)
    row = dict(model=model_name, method=method, setting=qcfg.setting, transform=transform, seed=seed,
               accuracy=res["accuracy"], n_eval=res["n"],
               **{f"acc_{c}": a for c, a in res["per_category"].items()},
               wall_s=cost.wall_seconds, cpu_s=cost.cpu_seconds, linear_fwd=cost.linear_fwd,
               linear_bwd=cost.linear_bwd, linear_passes=cost.linear_passes, block_passes=cost.block_passes,
               peak_memory_bytes=cost.peak_memory_bytes, peak_memory_kind=cost.peak_memory_kind,
               knobs=info["knobs"], info=dict(blocks=info["blocks"], transform=tr, calib=info["calib"],
                                              quant_config=info["quant_config"]),
               **(fields(info["blocks"]) if fields else {}))
    if deploy:
        twins = dict(quant_linears(m))                    # the fake-quant layers: references of the layer-local check
        pack_model(m)
        hooks, local = _record_layers(m, twins)
        packed = []
        run = lambda: packed.extend(predict(m, processor, samples, eval.batch_size, progress=progress))  # noqa: E731
        if fused:
            groups = shared_input_groups(m, run)          # the fused check's groups, traced on the packed pass
        else:
            run()
        for h in hooks:
            h.remove()
        row["info"]["predictions"] = dict(fake=preds, packed=packed)
        row.update(scheme=scheme(m)["name"], packed_acc=agreement(packed, [s["answer"] for s in samples]),
                   agreement=agreement(preds, packed), layer_max_rel_err=twin_check(m, twins, local)["max_rel_err"])
        if fused:
            row.update(fused_check(m, processor, samples[:eval.batch_size], packed, groups))
    if keep_model:
        row["model_object"] = m
    return row


@torch.no_grad()
def fused_check(packed_model: nn.Module, processor, samples: list[dict], packed_preds: list, groups: list) -> dict:
    """Fuse a copy of a packed model (one GEMM per input tensor, `groups` as traced on it: qvlm.deploy.fuse) and
    predict `samples` (one batch): {fused_groups, fused_agreement} -- the fraction of answers equal to the unfused
    packed model's `packed_preds`."""
    f = copy.deepcopy(packed_model)
    fused = fuse_shared_inputs(f, groups=groups)["fused"]
    got = predict(f, processor, samples, len(samples), progress=False)
    return dict(fused_groups=len(fused), fused_agreement=agreement(got, packed_preds))


def agreement(a: list, b: list) -> float:
    """Fraction of positions where two equally long answer lists agree (answers vs labels: accuracy)."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def run(model: nn.Module, processor, method: str, setting, seeds=(0,), **kw) -> list[dict]:
    """run_one for every calibration seed: one row per seed."""
    return [run_one(model, processor, method, setting, s, **kw) for s in seeds]


def data_free(method: str, qcfg: QuantConfig, transform: str = "none") -> bool:
    """True when a run does not depend on the calibration seed: a method that reads no calibration data, dynamic
    activations, no data-traced transform (its rows for other seeds are copies of the first, marked replicated)."""
    return (not methods.get(method).needs_data and methods.get(method).run is None and qcfg.a_granularity == "token"
            and transform == "none")


BEYOND_PAPER = "qvlm+rotate"     # this repository's variant beyond the paper: Q-VLM on the QuaRot rotation
SMOKE_METHODS = ("rtn", "brecq", "qvlm")
TABLE_SETTINGS = ("W8A8", "W6A6", "W4A8", "W4A4", "W4A16")   # the comparison table: the paper's W6A6 / W4A4 + deployment
CORE_SETTINGS = ("W8A8", "W6A6", "W4A4")    # where the cpu preset runs every method (the learned searches skip the rest)


def learned(method: str) -> bool:
    """True for a method that searches its rounding by optimisation under a step budget (AdaRound, BRECQ, Q-VLM):
    minutes per run where the others take seconds."""
    return "budget" in methods.get(method).knob_names()


def table_cell(preset: str):
    """keep(method, qcfg) -> bool for grid(): every cell, except that on the cpu preset the learned searches run
    only at CORE_SETTINGS (W4A8 / W4A16 rows of AdaRound, BRECQ and Q-VLM cost hours on 2 cores; W4A4 is never
    dropped)."""
    return lambda method, qcfg: preset != "cpu" or not learned(method) or qcfg.setting in CORE_SETTINGS


def table_methods(spec: str = "", mode: str = "full") -> list[str]:
    """The methods of a comparison: a comma-separated `spec`, or "" = every registered method (not fp) and the
    beyond-the-paper variant (full mode) | SMOKE_METHODS (smoke mode)."""
    if spec:
        return spec.split(",")
    if mode == "smoke":
        return list(SMOKE_METHODS)
    return [m for m in methods.METHODS if m != "fp"] + [BEYOND_PAPER]


def variant(method: str, label: str = "", transform: str | None = None, **knobs) -> dict:
    """One row label of a comparison: a method with its knobs (label defaults to the method's name) and optionally
    its own transform; "qvlm+rotate" spells method qvlm on the rotate transform."""
    spelled = method
    if "+" in method:
        method, transform = method.split("+", 1)
    if transform is not None and transform not in transforms.TRANSFORMS:
        raise QVLMError(f"unknown transform {transform!r} in {spelled!r}",
                        f"use one of {', '.join(transforms.TRANSFORMS)}, e.g. qvlm+rotate")
    methods.get(method).make_config(**knobs)                     # a misspelt knob fails here, before any run
    return dict(label=label or spelled, method=method, knobs=knobs, transform=transform)


def grid(model: nn.Module, processor, method_names: list, settings: list, seeds=(0,), *,
         knobs: dict | None = None, eval: EvalConfig | None = None, progress: bool = True,
         reuse: list[dict] | None = None, keep=None, cache=None, **kw) -> list[dict]:
    """run() over every (setting, method): `method_names` holds method names (each gets the `knobs` its config has)
    or `variant(...)` dicts (a label, a method and its own knobs on top of `knobs`). The FP model is evaluated once
    per setting ('fp' is not repeated per seed: nothing random enters it). A variant that cannot run a setting
    leaves a row with `error` (shown, not hidden). Rows carry `variant` = the label. `reuse`: rows of earlier
    grids; a run whose run_key equals one of theirs is that row again (relabelled, `reused_from` = its variant),
    not a second search (e.g. a sweep point that is the main variant). `keep(method, qcfg)`: which cells run
    (default all; table_cell(preset) drops the learned searches' deployment-only settings on the cpu preset).
    `cache`: a RowCache directory (default $QVLM_ROW_CACHE; none when unset): finished rows are stored there and a
    run already stored is read back instead of searched again (`resumed_from` names the file)."""
    variants = [v if isinstance(v, dict) else variant(v) for v in method_names]
    check_knobs([v["method"] for v in variants], knobs)
    eval = eval or EvalConfig()
    samples = eval_samples(eval)
    store = row_cache(model, cache)
    done = {row_key(r): r for r in reuse or [] if "error" not in r and "info" in r}
    rows = []
    todo = [(q, v) for q in map(setting_of, settings) for v in variants if keep is None or keep(v["method"], q)]
    bar = tqdm(todo, desc="grid", disable=not progress)
    for qcfg, v in bar:
        bar.set_postfix_str(f"{qcfg.setting} {v['label']}")
        first = None
        vkw = {**kw, "transform": v.get("transform") or kw.get("transform", "none")}    # a variant's own transform wins
        for seed in ([seeds[0]] if v["method"] == "fp" else seeds):
            if first is not None and data_free(v["method"], qcfg, vkw["transform"]):
                rows.append(dict(first, seed=seed, replicated_from=first["seed"]))   # nothing random enters it
                continue
            vknobs = {**(knobs or {}), **v["knobs"]}
            planned = planned_key(v["method"], vkw["transform"], qcfg, seed, vknobs, vkw.get("calib"), len(samples))
            hit = done.get(planned)
            if hit is not None:
                first = first or dict(hit, variant=v["label"])
                rows.append(dict(hit, variant=v["label"], reused_from=hit["variant"]))
                continue
            stored_as = store.key(planned, eval, vkw) if store else None
            row = store.get(stored_as) if store else None
            try:
                if row is None:
                    row = run_one(model, processor, v["method"], qcfg, seed, knobs=vknobs,
                                  eval=eval, samples=samples, **vkw)
                    if store:
                        store.put(stored_as, row)
            except QVLMError as e:
                rows.append(dict(variant=v["label"], method=v["method"], setting=qcfg.setting, seed=seed,
                                 error=str(e)))
                break
            first = first or dict(variant=v["label"], **row)
            rows.append(dict(variant=v["label"], **row))
    return rows


@torch.no_grad()
def fp_row(model: nn.Module, processor, eval: EvalConfig | None = None, model_name: str = "") -> dict:
    """The FP reference row (same keys as a quantized row, zero cost)."""
    eval = eval or EvalConfig()
    res = evaluate(model, processor, eval_samples(eval), eval.batch_size, progress=False)
    return dict(model=model_name, method="fp", setting="FP", transform="none", seed=0, accuracy=res["accuracy"],
                n_eval=res["n"], **{f"acc_{c}": a for c, a in res["per_category"].items()}, wall_s=0.0, cpu_s=0.0,
                linear_fwd=0, linear_bwd=0, linear_passes=0, block_passes=0, peak_memory_bytes=0, peak_memory_kind="", knobs={},
                info={})


@torch.no_grad()
def probe_accumulator(model: nn.Module, processor, setting, samples: list[dict], probe: str = "") -> dict:
    """Quantize a copy with RTN, run `samples` to capture the input of one linear (default: the first LLM linear),
    pack that layer, and compare its int32 accumulator with the fake-quant integer matmul: they must be equal."""
    qcfg = setting_of(setting)
    m, _ = methods.quantize(copy.deepcopy(model), processor, "rtn", qcfg, progress=False)
    qls = dict(quant_linears(m))
    probe = probe or next((n for n in qls if "language_model" in n), next(iter(qls)))
    seen = []
    h = qls[probe].register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()) and None)
    predict(m, processor, samples[:4], 4, progress=False)
    h.remove()
    acc_kernel, acc_fake = integer_accumulator(qls[probe], pack_layer(qls[probe]), seen[0])
    return dict(setting=qcfg.setting, layer=probe, shape=tuple(acc_kernel.shape), K=seen[0].shape[-1],
                max_abs=int(acc_kernel.abs().max()), max_abs_diff=int((acc_kernel - acc_fake).abs().max()))


def export_row(model: nn.Module, processor, method: str, setting, out_dir, seed: int = 0, *,
               eval: EvalConfig | None = None, calib: CalibConfig | None = None) -> dict:
    """Quantize a copy with `method`, export it as compressed-tensors to `out_dir` (qvlm.deploy.export), reload it
    with transformers' from_pretrained and evaluate both on the same samples: one row with the fake-quant and the
    reloaded accuracy, their prediction agreement, whether the reloaded weights are bit-exact, the formats used and
    the export's size on disk."""
    eval = eval or EvalConfig()
    samples = eval_samples(eval)
    row = run_one(model, processor, method, setting, seed, calib=calib, eval=eval, samples=samples, keep_model=True)
    qmodel = row.pop("model_object")
    summary = export_compressed_tensors(qmodel, out_dir, processor=processor)
    back, back_processor = load_export(out_dir, device=llava.model_device(qmodel).type)
    fake = predict(qmodel, processor, samples, eval.batch_size, progress=False)
    got = predict(back, back_processor, samples, eval.batch_size, progress=False)
    labels = [s["answer"] for s in samples]
    return dict(method=method, setting=row["setting"], seed=seed, fake_acc=agreement(fake, labels), reloaded_acc=agreement(got, labels),
                agreement=agreement(fake, got), n_eval=len(samples),
                weights_bit_exact=summary["weights_bit_exact"],
                formats="+".join(sorted({g["scheme"]["format"] for g in summary["groups"].values()})),
                disk_mib=sum(f.stat().st_size for f in Path(out_dir).iterdir() if f.is_file()) / 2 ** 20)


def transformed(model: nn.Module, processor, name: str, calib: CalibConfig | None = None,
                qcfg: QuantConfig | None = None, dataset: str = EvalConfig.dataset) -> tuple[nn.Module, dict]:
    """(a copy of the FP model with transform `name` applied, its record); the FP model is not modified. The same
    copy a run_one with this transform, calibration seed and dataset quantizes (a rotation is seeded by calib.seed)."""
    m = copy.deepcopy(model)
    return m, transforms.apply(m, processor, name, calib, dataset=dataset, qcfg=qcfg)


def transform_outliers(model: nn.Module, processor, samples: list[dict], names=transforms.TRANSFORMS, *,
                       calib: CalibConfig | None = None, qcfg: QuantConfig | None = None, batch_size: int = 16,
                       progress: bool = True) -> pd.DataFrame:
    """The per-linear-input outlier table (activation_outliers' "channels": absmax ratio, kurtosis, ...) of the FP
    model after each transform in `names`, each on a fresh copy (calibration data `calib` for the transforms that
    trace or search; `samples` are only read), with a `transform` column. The FP model is not modified."""
    out = []
    for name in tqdm(list(names), desc="transforms", disable=not progress, leave=False):
        m, _ = transformed(model, processor, name, calib, qcfg)
        out.append(activation_outliers(m, processor, samples, batch_size)["channels"].assign(transform=name))
        del m
    return pd.concat(out, ignore_index=True)
