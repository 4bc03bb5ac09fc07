"""Notebooks are committed clean: one `parameters` cell (first code cell, annotated literals only), no outputs,
no sys.path edits, numbered NN_*.ipynb."""
import ast
import json

import pytest

from qvlm.reproduce import notebooks

NBS = notebooks()


def test_there_are_notebooks():
    assert NBS, "no notebooks/NN_*.ipynb found"
    assert NBS[0].name.startswith("00_")


@pytest.mark.parametrize("nb", NBS, ids=lambda p: p.stem)
def test_hygiene(nb):
    cells = json.loads(nb.read_text())["cells"]
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
    assert {"MODE", "MODEL", "OUT_DIR", "SEED"} <= names, f"{nb.name}: missing standard parameters"
    lines = [l for l in "".join(params[0]["source"]).splitlines() if l.strip()]
    assert all("#" in l for l in lines), f"{nb.name}: every parameter needs a trailing comment"
    # papermill must be able to read every parameter (its parser trips on e.g. `# "" = ...` comments,
    # which silently drops the parameter from `papermill --help-notebook` and warns on every run)
    import papermill as pm
    parsed = set(pm.inspect_notebook(str(nb)))
    assert parsed == names, f"{nb.name}: papermill cannot parse parameters {sorted(names - parsed)}"


def test_readme_maps_every_notebook():
    from qvlm.paths import REPO_ROOT
    text = (REPO_ROOT / "README.md").read_text()
    block = text[text.index("<!-- notebook-map:start -->"):text.index("<!-- notebook-map:end -->")]
    missing = [nb.stem for nb in NBS if f"`{nb.stem}`" not in block]
    assert not missing, f"README notebook map lacks {missing}"
