"""Results recording: the last cell of every notebook calls `save(...)`.

Writes, atomically, under `out_dir`:
    metrics.json            {"config": ..., "metrics": ...}  (what the papermill regression tests read)
    <figure>.png            every figure (matplotlib), 150 dpi
    <table>.csv             every table (list of dicts or pandas DataFrame)
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

from ..utils import atomic_write_json, atomic_write_text


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def table_rows(table) -> list[dict]:
    """A pandas DataFrame or a list of dicts -> list of dicts."""
    if hasattr(table, "to_dict"):
        return table.reset_index(drop=table.index.name is None).to_dict("records")
    return list(table)


def save(out_dir, cfg=None, metrics: dict | None = None, figures: dict | None = None,
         tables: dict | None = None) -> Path:
    """Write metrics.json + one PNG per figure + one CSV per table into `out_dir`; returns the metrics path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in (figures or {}).items():
        tmp = out / f".{name}.png.tmp"
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
        tmp.replace(out / f"{name}.png")
    for name, table in (tables or {}).items():
        rows = table_rows(table)
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        atomic_write_text(out / f"{name}.csv", buf.getvalue())
    path = out / "metrics.json"
    atomic_write_json(path, {"config": _jsonable(cfg), "metrics": _jsonable(metrics or {}),
                             "figures": sorted(figures or {}), "tables": sorted(tables or {})})
    return path
