"""Notebooks are committed clean: one `parameters` cell (first code cell, annotated literals only), no outputs, no
sys.path edits, no function definitions, numbered NN_*.ipynb, nbformat 4.5 with cell ids and the installed kernelspec
(so JupyterLab opens them unmodified)."""
import ast
import json

import papermill as pm
import pytest

from qvlm.paths import KERNELSPEC, LANGUAGE_INFO, REPO_ROOT, notebooks
from qvlm.reproduce import SMOKE_PARAMETERS, notebook_parameters

NBS = notebooks()


def test_there_are_notebooks():
    assert NBS, "no notebooks/NN_*.ipynb found"
    assert NBS[0].name.startswith("00_")


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.stem)
def test_hygiene(nb):
    doc = json.loads(nb.read_text())
    cells = doc["cells"]
    # what JupyterLab writes when it opens and saves the notebook: committed as is, so opening it changes nothing
    assert (doc["nbformat"], doc["nbformat_minor"]) == (4, 5), f"{nb.name}: not nbformat 4.5"
    assert doc["metadata"].get("kernelspec") == KERNELSPEC, f"{nb.name}: kernelspec differs from the installed one"
    assert doc["metadata"].get("language_info") == LANGUAGE_INFO, f"{nb.name}: language_info differs"
    ids = [c.get("id") for c in cells]
    assert all(ids) and len(set(ids)) == len(ids), f"{nb.name}: cells need unique ids"
    code = [c for c in cells if c["cell_type"] == "code"]
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{nb.name}: {len(params)} parameters cells (want 1)"
    assert params[0] is code[0], f"{nb.name}: the parameters cell must be the first code cell"
    for c in code:
        assert not c.get("outputs"), f"{nb.name}: committed outputs"
        assert c.get("execution_count") is None, f"{nb.name}: committed execution counts"
        assert "sys.path" not in "".join(c["source"]), f"{nb.name}: edits sys.path"
    tree = ast.parse("".join(params[0]["source"]))
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{nb.name}: parameters cell holds only annotated assignments"
        assert isinstance(node.value, ast.Constant), f"{nb.name}: parameter {ast.unparse(node.target)} is not a literal"
        names.add(node.target.id)
    assert {"MODE", "PRESET", "MODEL", "OUT_DIR", "SEED"} <= names, f"{nb.name}: missing standard parameters"
    # thin notebooks: no function or class definitions (logic lives in the package)
    for c in code[1:]:
        for node in ast.walk(ast.parse("".join(c["source"]))):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), \
                f"{nb.name}: defines {node.name}; move it into qvlm/"
    lines = [l for l in "".join(params[0]["source"]).splitlines() if l.strip()]
    assert all("#" in l for l in lines), f"{nb.name}: every parameter needs a trailing comment"
    # papermill must be able to read every parameter (its parser trips on e.g. `# "" = ...` comments,
    # which silently drops the parameter from `papermill --help-notebook` and warns on every run)
    parsed = set(pm.inspect_notebook(str(nb)))
    assert parsed == names, f"{nb.name}: papermill cannot parse parameters {sorted(names - parsed)}"


def test_smoke_parameters_name_real_parameters():
    """A renamed or retyped parameter must not leave a smoke value that papermill would inject as a new variable."""
    by_stem = {nb.stem: nb for nb in NBS}
    for stem, values in SMOKE_PARAMETERS.items():
        assert stem in by_stem, f"SMOKE_PARAMETERS names {stem}, which is not a notebook"
        declared = pm.inspect_notebook(str(by_stem[stem]))
        for name, value in values.items():
            assert name in declared, f"{stem}: smoke parameter {name} is not in its parameters cell"
            assert type(value).__name__ == declared[name]["inferred_type_name"], (stem, name, value)
            nb = by_stem[stem]
            assert notebook_parameters(nb, "smoke", REPO_ROOT)[name] == value
            assert name not in notebook_parameters(nb, "full", REPO_ROOT)             # full mode keeps the default
            assert notebook_parameters(nb, "smoke", REPO_ROOT, {name: "x"})[name] == "x"  # the caller's value wins


def test_readme_maps_every_notebook():
    text = (REPO_ROOT / "README.md").read_text()
    block = text[text.index("<!-- notebook-map:start -->"):text.index("<!-- notebook-map:end -->")]
    missing = [nb.stem for nb in NBS if f"`{nb.stem}`" not in block]
    assert not missing, f"README notebook map lacks {missing}"
