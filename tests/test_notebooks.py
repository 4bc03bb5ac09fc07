"""Papermill: every notebooks/NN_*.ipynb runs end to end in smoke mode, and its pinned smoke metrics match
tests/reference/NN_*.json within the stated tolerances (regenerate on purpose: `make update-reference`)."""
import json
import math
import os
from pathlib import Path

import pytest

from qvlm.reproduce import notebooks, run_notebook

REF = Path(__file__).parent / "reference"
SMOKE_TIMEOUT = 300          # seconds per cell; each notebook's smoke budget is ~2 min


@pytest.mark.notebooks
@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_notebook_smoke(nb, tmp_path):
    m = run_notebook(nb, "smoke", tmp_path / "out", tmp_path / nb.name, timeout=SMOKE_TIMEOUT)
    assert m["config"]["mode"] == "smoke"
    metrics = m["metrics"]
    for k, v in metrics.get("regression", {}).items():
        assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
    ref_path = REF / f"{nb.stem}.json"
    if not ref_path.exists():
        pytest.fail(f"no reference values for {nb.stem}: run `make update-reference` and commit {ref_path}")
    ref = json.loads(ref_path.read_text())
    for k, r in ref.items():
        assert k in metrics.get("regression", {}), f"{nb.stem}: pinned metric {k!r} is no longer reported"
        got = metrics["regression"][k]
        assert got == pytest.approx(r["value"], abs=r["abs"], rel=r["rel"]), \
            f"{nb.stem}: {k} = {got} drifted from the reference {r['value']} (abs {r['abs']}, rel {r['rel']})"
