"""Shared figures (matplotlib / seaborn). Notebooks call these; each returns a Figure for `report.save`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..data import LETTERS

sns.set_theme(style="whitegrid", context="notebook")


def sample_grid(samples: list[dict], n: int = 8, cols: int = 4, preds: list[int] | None = None):
    """Images with their question, lettered choices and answer (and a prediction, if given)."""
    n = min(n, len(samples))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax, i in zip(axes.flat, range(n)):
        s = samples[i]
        if s.get("image") is not None:
            ax.imshow(s["image"], interpolation="nearest")
        opts = "  ".join(f"{LETTERS[j]}.{c}" for j, c in enumerate(s["choices"]))
        title = f"[{s['category']}] {s['question']}\n{opts}\nanswer {LETTERS[s['answer']]}"
        if preds is not None:
            title += f" | pred {LETTERS[preds[i]]}"
        ax.set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def category_bars(results: dict[str, dict], chance: float | None = None, title: str = "accuracy by category"):
    """Grouped bars: {label: evaluate() result} -> per-category accuracy, with an overall group."""

    rows = []
    for label, r in results.items():
        rows += [dict(model=label, category=c, accuracy=a) for c, a in r["per_category"].items()]
        rows.append(dict(model=label, category="overall", accuracy=r["accuracy"]))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.barplot(pd.DataFrame(rows), x="category", y="accuracy", hue="model", ax=ax)
    if chance is not None:
        ax.axhline(chance, ls="--", c="k", lw=1, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------- notebooks 01-05
PART_COLOURS = {"vision": "#dbe9f6", "projector": "#fde9d9", "llm": "#e2f0d9"}


def _shade_parts(ax, parts: list[str]) -> None:
    """Shade the x-ranges of consecutive equal `parts` (vision | projector | llm) and label them on top."""
    start = 0
    for i in range(1, len(parts) + 1):
        if i == len(parts) or parts[i] != parts[start]:
            ax.axvspan(start - 0.5, i - 0.5, color=PART_COLOURS.get(parts[start], "#eeeeee"), zorder=0, lw=0)
            ax.text((start + i - 1) / 2, 1.0, parts[start], transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8)
            start = i


def entropy_profile(df, y: str = "H", hue: str = "bits", title: str = "H(x_q) per quantized linear",
                    max_col: str | None = "log_K", ax=None):
    """Per-layer profile: df has one row per (layer, hue) with columns `pos` (forward index), `part`, `name`, y,
    hue and optionally `max_col` (the log K ceiling, drawn dashed)."""

    if ax is None:
        fig, ax = plt.subplots(figsize=(11, 3.6))
    fig = ax.figure
    first = df[df[hue] == df[hue].iloc[0]].sort_values("pos")
    _shade_parts(ax, list(first["part"]))
    pal = sns.color_palette("viridis", df[hue].nunique())
    for c, (h, g) in zip(pal, df.groupby(hue, sort=True)):
        g = g.sort_values("pos")
        ax.plot(g["pos"], g[y], marker="o", ms=3, lw=1.2, color=c, label=f"{hue}={h}")
        if max_col and max_col in g:
            ax.axhline(float(g[max_col].iloc[0]), color=c, ls="--", lw=0.8)
    step = max(1, len(first) // 40)
    ticks = np.arange(0, len(first), step)
    ax.set_xticks(ticks)
    ax.set_xticklabels([first["name"].iloc[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, len(first) - 0.5)
    ax.set_ylabel(f"{y} (nats)")
    ax.set_title(title, pad=14)
    ax.legend(fontsize=8, loc="lower left", ncol=4)
    fig.tight_layout()
    return fig


def paired_bars(df, x: str, cols: list[str], title: str = "", ylabel: str = "", ax=None):
    """Grouped bars of several columns of df per row label `x` (e.g. H_image vs H_text per LLM layer)."""
    long = df.melt(id_vars=[x], value_vars=cols, var_name="series", value_name="value")
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 3.4))
    sns.barplot(long, x=x, y="value", hue="series", ax=ax)
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.set_xlabel("")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.figure.tight_layout()
    return ax.figure


def scatter_fit(df, x: str, y: str, hue: str, fits: dict, title: str = "", xlabel: str = "", ylabel: str = "",
                ax=None):
    """Scatter of (x, y) coloured by `hue`, with one fitted line per hue value: fits[h] = qvlm.analysis.dependency.fit_line
    result ({slope, intercept, r2}); the legend shows each R^2."""

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4.2))
    pal = sns.color_palette("tab10", max(len(fits), 1))
    for c, (h, g) in zip(pal, df.groupby(hue, sort=True)):
        ax.scatter(g[x], g[y], color=c, s=22, alpha=0.8)
        f = fits.get(h)
        if f is not None:
            xs = np.linspace(float(g[x].min()), float(g[x].max()), 20)
            ax.plot(xs, f["slope"] * xs + f["intercept"], color=c, lw=1.3, label=f"{hue}={h}: R²={f['r2']:.2f}")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def partition_profile(names: list[str], unit_scores: list[float], blocks: list[list[int]], parts: list[str],
                      threshold: float | None = None, title: str = "", ax=None):
    """Bars of a per-unit score (e.g. H(x_q) of each unit's input) coloured by the block each unit belongs to;
    block boundaries as vertical lines and the merge threshold (edge k merges iff unit k+1 >= it) dashed."""
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 3.6))
    _shade_parts(ax, parts)
    pal = sns.color_palette("tab10", 10)
    colour = {u: pal[b % 10] for b, blk in enumerate(blocks) for u in blk}
    ax.bar(range(len(names)), unit_scores, color=[colour[i] for i in range(len(names))], edgecolor="k", lw=0.3)
    for blk in blocks[1:]:
        ax.axvline(blk[0] - 0.5, color="k", lw=0.8)
    if threshold is not None and threshold == threshold:
        ax.axhline(threshold, color="crimson", ls="--", lw=1, label=f"threshold {threshold:.3f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(0.0, None)                                      # bars start at 0: heights compare honestly
    step = max(1, len(names) // 45)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels(names[::step], rotation=90, fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("H(x_q) (nats)")
    ax.set_title(title or f"{len(blocks)} blocks", pad=14)
    ax.figure.tight_layout()
    return ax.figure


def twin_lines(df, x: str, left: str, right: str, title: str = "", xlabel: str = "", left_label: str = "",
               right_label: str = "", symlog_x: bool = False):
    """Two y-axes over a common x (e.g. Fig. 3(a): accuracy and search cost vs max depth); symlog_x for sweeps
    that span decades and include 0 (e.g. eta = 0, 0.1, 1, 10)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if symlog_x:
        ax.set_xscale("symlog", linthresh=0.1)
    d = df.sort_values(x)
    ax.plot(d[x], d[left], marker="o", color="tab:blue")
    ax.set_ylabel(left_label or left, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(d[x], d[right], marker="s", color="tab:red", ls="--")
    ax2.set_ylabel(right_label or right, color="tab:red")
    ax2.grid(False)
    ax.set_xlabel(xlabel or x)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _spread_labels(xy: list[tuple[float, float]], x_span: float, y_span: float) -> list[float]:
    """Vertical label offsets (points) so that labels of (nearly) coincident points stack instead of overlapping."""
    offsets, seen = [], []
    for x, y in xy:
        k = sum(abs(x - a) < 0.04 * x_span and abs(y - b) < 0.04 * y_span for a, b in seen)
        offsets.append(3 + 10 * k)
        seen.append((x, y))
    return offsets


def cost_accuracy(df, x: str, y: str, label: str, title: str = "", xlabel: str = "", ylabel: str = "",
                  ref: float | None = None, ref_label: str = "FP", xerr: str | None = None, yerr: str | None = None):
    """Configurations in (cost, accuracy) space, each point labelled (partitions, methods); optional error bars
    (columns `xerr`, `yerr`: e.g. the std over seeds). Labels of tied points are stacked, not overprinted."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    pal = sns.color_palette("tab10", max(len(df), 1))
    for c, (_, r) in zip(pal, df.iterrows()):
        ax.errorbar(r[x], r[y], xerr=r[xerr] if xerr else None, yerr=r[yerr] if yerr else None, fmt="o", ms=7,
                    color=c, capsize=3)
    xs, ys = list(df[x].astype(float)), list(df[y].astype(float))
    span_x = (max(xs) - min(xs)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    for (_, r), off in zip(df.iterrows(), _spread_labels(list(zip(xs, ys)), span_x, span_y)):
        ax.annotate(str(r[label]), (r[x], r[y]), fontsize=8, xytext=(6, off), textcoords="offset points")
    ax.margins(x=0.3, y=0.15)
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=1, label=ref_label)
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def method_bars(summary, x: str = "setting", y: str = "accuracy", hue: str = "method", title: str = "",
                ylabel: str = "accuracy", ref: float | None = None):
    """Grouped bars of `<y>_mean` with `<y>_std` error bars (a qvlm.report.stats.summarize table), e.g. accuracy
    of every method at each setting."""
    fig, ax = plt.subplots(figsize=(10, 4))
    xs, hs = list(dict.fromkeys(summary[x])), list(dict.fromkeys(summary[hue]))
    width = 0.8 / max(len(hs), 1)
    pal = sns.color_palette("tab10", max(len(hs), 1))
    for j, (h, c) in enumerate(zip(hs, pal)):
        sub = summary[summary[hue] == h].set_index(x)
        pos = [i + (j - (len(hs) - 1) / 2) * width for i, v in enumerate(xs) if v in sub.index]
        vals = [sub.loc[v] for v in xs if v in sub.index]
        ax.bar(pos, [r[f"{y}_mean"] for r in vals], width, yerr=[r[f"{y}_std"] for r in vals], color=c, label=h,
               capsize=2)
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, None)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    return fig


def layer_entropy(layers, title: str = ""):
    """Entropy per transformer layer (qvlm.analysis.entropy.layer_frame): pooled histogram (solid) and mean of
    the layer's units (dashed), one colour per bit-width."""
    fig, ax = plt.subplots(figsize=(11, 3.6))
    first = layers[layers["bits"] == layers["bits"].min()].sort_values("pos")
    _shade_parts(ax, list(first["part"]))
    pal = sns.color_palette("viridis", layers["bits"].nunique())
    for c, (b, g) in zip(pal, layers.groupby("bits", sort=True)):
        g = g.sort_values("pos")
        ax.plot(g["pos"], g["H_pooled_all"], marker="o", ms=3, color=c, label=f"{b}-bit, pooled")
        ax.plot(g["pos"], g["H_mean_all"], ls="--", lw=1, color=c, label=f"{b}-bit, mean of units")
    step = max(1, len(first) // 45)
    ax.set_xticks(first["pos"].iloc[::step])
    ax.set_xticklabels(first["layer"].iloc[::step], rotation=90, fontsize=8)
    ax.set_ylim(0, None)
    ax.set_ylabel("H(x_q) (nats)")
    ax.set_title(title, pad=14)
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    return fig


def outlier_ratios(channels, title: str = ""):
    """Per distinct linear input: max channel |x| over the median channel's (log scale), shaded by part."""
    fig, ax = plt.subplots(figsize=(11, 3.6))
    d = channels.reset_index(drop=True)
    _shade_parts(ax, list(d["part"]))
    ax.bar(range(len(d)), d["ratio"], color="tab:purple")
    ax.set_yscale("log")
    step = max(1, len(d) // 45)
    ax.set_xticks(range(0, len(d), step))
    ax.set_xticklabels(d["unit"].iloc[::step], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(d) - 0.5)
    ax.set_ylabel("max / median channel |x|")
    ax.set_title(title, pad=14)
    fig.tight_layout()
    return fig


def transform_profile(df, y: str, x: str = "unit", hue: str = "transform", title: str = "", ylabel: str = "",
                      log: bool = False):
    """One line per `hue` value (e.g. transform) of a per-input or per-layer quantity in forward order; x labels and
    part shading from the first group (every group has the same rows in the same order)."""
    fig, ax = plt.subplots(figsize=(11, 3.6))
    groups = list(df.groupby(hue, sort=False))
    first = groups[0][1].reset_index(drop=True)
    if "part" in first:
        _shade_parts(ax, list(first["part"]))
    for label, g in groups:
        ax.plot(range(len(g)), g[y].to_numpy(), marker="o", ms=3, lw=1.2, label=str(label))
    step = max(1, len(first) // 45)
    ax.set_xticks(range(0, len(first), step))
    ax.set_xticklabels(first[x].iloc[::step], rotation=90, fontsize=8)
    ax.set_xlim(-0.5, len(first) - 0.5)
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, None)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, pad=14)
    ax.legend(fontsize=8, ncol=len(groups), loc="upper left")
    fig.tight_layout()
    return fig


def channel_absmax(profiles: dict, title: str = "", xlabel: str = "input channel"):
    """max |x| per input channel of one layer, one line per labelled profile (e.g. before / after outliers)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for label, v in profiles.items():
        ax.plot(range(len(v)), [float(t) for t in v], marker=".", lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("max |x| over tokens")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def dependency_profile(per_edge, title: str = ""):
    """Three stacked panels along the edges: H of the successor, Eq. 4's D, relative DED (mean +- std)."""
    fig, axes = plt.subplots(3, 1, figsize=(10, 6.5), sharex=True)
    x = np.arange(len(per_edge))
    axes[0].plot(x, per_edge["H_next"], marker="o")
    axes[0].set_ylabel("H(x_q) next (nats)")
    axes[1].plot(x, per_edge["D"], marker="o", color="tab:orange")
    axes[1].set_ylabel("Eq. 4 D (nats)")
    m = per_edge["mean"] if "mean" in per_edge else per_edge["rel_ded"]
    s = per_edge["std"].fillna(0) if "std" in per_edge else 0
    axes[2].errorbar(x, m, yerr=s, marker="o", color="tab:green", capsize=2)
    axes[2].axhline(0, color="k", lw=0.6)
    axes[2].set_ylabel("relative DED")
    for ax in axes[:2]:
        ax.set_ylim(0, None)
    labels = [f"{a}→{b.split('.')[-1]}" for a, b in zip(per_edge["unit"], per_edge["successor"])]
    step = max(1, len(labels) // 40)
    axes[2].set_xticks(x[::step])
    axes[2].set_xticklabels(labels[::step], rotation=90, fontsize=8)
    axes[0].set_title(title)
    fig.tight_layout()
    return fig


def dependency_scatter(ded, fits: dict, title: str = ""):
    """DED against H (left) and against Eq. 4's D (right), one colour per seed, the pooled fit in black."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, proxy, label in ((axes[0], "H", "H(x_q) of the successor (nats)"), (axes[1], "D", "Eq. 4 D (nats)")):
        col = "H_next" if proxy == "H" else "D"
        scatter_fit(ded, x=col, y="rel_ded", hue="seed", fits=fits[proxy], xlabel=label, ylabel="relative DED",
                    title=f"DED ~ {proxy}", ax=ax)
        f = fits[f"{proxy}_pooled"]
        xs = np.linspace(float(ded[col].min()), float(ded[col].max()), 20)
        ax.plot(xs, f["slope"] * xs + f["intercept"], color="k", ls="--", lw=1.2,
                label=f"pooled: R²={f['r2']:.2f}, slope {f['slope']:+.2g}")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def before_after(df, x: str, cols: list[str], ylabel: str = "", title: str = ""):
    """One line per column over the rows of df (e.g. a layer's entropy before / after VEO), parts shaded."""
    fig, ax = plt.subplots(figsize=(11, 3.6))
    if "part" in df:
        _shade_parts(ax, list(df["part"]))
    for c in cols:
        ax.plot(range(len(df)), df[c], marker="o", ms=3, label=c)
    step = max(1, len(df) // 45)
    ax.set_xticks(range(0, len(df), step))
    ax.set_xticklabels(df[x].iloc[::step], rotation=90, fontsize=8)
    ax.set_ylim(0, None)
    ax.set_ylabel(ylabel)
    ax.set_title(title, pad=14)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def veo_frontier(rows: list[dict], guard: float, title: str = ""):
    """Each VEO run (bench.veo rows) as a point: change of the targeted entropy (%, x) against the change of FP
    accuracy on val (points, y), one colour per anchor, labelled eta / lr; the dashed line is the guard (runs below
    it are reverted). A working VEO would sit left of x = 0 on or above the line."""
    df = pd.DataFrame(rows).assign(anchor=lambda d: d.get("anchor", "ar"))
    df = df.assign(x=100 * df["H_change"], y=100 * (df["fp_val_after"] - df["fp_val_before"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pal = dict(zip(sorted(df["anchor"].unique()), sns.color_palette("tab10")))
    for anchor, g in df.groupby("anchor", sort=True):
        ax.scatter(g["x"], g["y"], color=pal[anchor], s=30, alpha=0.85, label=f"anchor {anchor}")
        for r in g.itertuples():
            ax.annotate(f"{r.eta:g}/{r.lr:g}", (r.x, r.y), fontsize=6, alpha=0.7, xytext=(3, 2),
                        textcoords="offset points")
    ax.axhline(-100 * guard, color="0.4", ls="--", lw=1, label=f"guard (-{100 * guard:.1f} points)")
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("targeted entropy H(x_q), change after VEO (%)")
    ax.set_ylabel("FP accuracy on val, change (points)")
    ax.set_title(title or "VEO runs: entropy lowered vs FP accuracy kept (labels: eta / lr)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
