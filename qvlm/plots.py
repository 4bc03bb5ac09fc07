"""Shared figures (matplotlib / seaborn). Notebooks call these; each returns a Figure for `report.save`."""
from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns

from .data import LETTERS

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
    import pandas as pd

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
