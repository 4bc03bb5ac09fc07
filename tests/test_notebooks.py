"""Papermill: every notebooks/NN_*.ipynb runs end to end in smoke mode, and its pinned smoke metrics match
tests/reference/NN_*.json within the stated tolerances (regenerate on purpose: `make update-reference`).

All notebooks of one pytest session write into one session-scoped directory, `<shared>/<NN_name>/`, the layout
notebook 07 reads through its SOURCES parameter: 07 then reuses the smoke outputs of 00-06 instead of recomputing
them. Run alone (`pytest -k 07`), 07 finds them missing and runs 00-06 itself into the same directory."""
import json
import math
import os
from pathlib import Path

import pytest

from qvlm.paths import notebooks
from qvlm.reproduce import executed_path, run_notebook

REF = Path(__file__).parent / "reference"
SMOKE_BUDGET = 90            # seconds a notebook's whole smoke run takes on an idle 2-core machine (README lists them)
SMOKE_TIMEOUT = 10 * SMOKE_BUDGET  # per cell: survives a machine several times slower or busier (06's grid cell
                                   # took 500 s beside a full-mode run; idle it takes ~60 s)
SMOKE_MODEL = "tiny"         # the tests' model; the real-weights model is exercised by tests/unit/test_smol.py


SOURCES_PARAM = {"07_reproduce_paper": "SOURCES"}    # notebooks that read the others' outputs from the shared dir
# 07's first cell runs any of 00-06 whose outputs are missing (`pytest -k 07` alone: all seven, in one cell)
CELL_TIMEOUT = {"07_reproduce_paper": SMOKE_TIMEOUT * 8}


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory):
    """One directory for every notebook's smoke outputs in this session: <dir>/<NN_name>/metrics.json."""
    return tmp_path_factory.mktemp("smoke")


@pytest.mark.notebooks
@pytest.mark.parametrize("nb", notebooks(), ids=lambda p: p.stem)
def test_notebook_smoke(nb, smoke_dir):
    extra = {SOURCES_PARAM[nb.stem]: str(smoke_dir)} if nb.stem in SOURCES_PARAM else {}
    extra["MODEL"] = SMOKE_MODEL
    m = run_notebook(nb, "smoke", smoke_dir / nb.stem, executed_path(nb, "smoke", smoke_dir),
                     timeout=CELL_TIMEOUT.get(nb.stem, SMOKE_TIMEOUT), parameters=extra)
    assert m["config"]["mode"] == "smoke" and m["config"]["model"] == SMOKE_MODEL
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
