"""The committed executed notebooks (results/published/) must come from the current notebooks: a notebook whose
source cells changed since publication is reported, and so is package code that changed (rerun `make reproduce`).

A changed notebook fails the test (its published outputs would describe code that no longer exists); changed package
code only warns, because the numbers may still hold and a full reproduction takes hours on 2 cores, and so does a
notebook not published yet (`python -m qvlm.reproduce --only NN` publishes notebooks one at a time)."""
import json
import warnings

import pytest

from qvlm.paths import notebooks
from qvlm.report import publish

MAN = publish.PUBLISHED / "manifest.json"


@pytest.mark.skipif(not MAN.is_file(), reason="nothing published yet (make reproduce)")
def test_published_notebooks_are_current():
    reasons = publish.stale(notebooks())
    hard = [r for r in reasons if "package code" not in r and "is not published" not in r]
    for r in reasons:
        if r not in hard:
            warnings.warn(f"published results: {r}")
    assert not hard, "published notebooks are stale (rerun `make reproduce`): " + "; ".join(hard)


@pytest.mark.skipif(not MAN.is_file(), reason="nothing published yet (make reproduce)")
def test_published_size_budget_and_figures_exist():
    man = json.loads(MAN.read_text())
    assert man["size_bytes"] <= publish.SIZE_BUDGET
    for e in man["notebooks"].values():
        for f in e["figures"]:
            assert (publish.PUBLISHED / f).is_file(), f


def test_stale_detects_a_changed_notebook(tmp_path):
    nbs = notebooks()[:1]
    out = tmp_path / "pub"
    out.mkdir()
    man = dict(code_hash=publish.code_hash(), git_commit="x",
               notebooks={nbs[0].stem: dict(source_hash="not-the-hash", figures=[])})
    (out / "manifest.json").write_text(json.dumps(man))
    assert any("changed since it was published" in r for r in publish.stale(nbs, out))
    man["notebooks"][nbs[0].stem]["source_hash"] = publish.notebook_hash(nbs[0])
    (out / "manifest.json").write_text(json.dumps(man))
    assert publish.stale(nbs, out) == []


def test_publishing_one_notebook_keeps_the_others(tmp_path):
    """`reproduce --only NN` publishes one notebook: the entries of those published earlier stay, with their own
    commit and code hash (a notebook run at an older commit is reported as such, not as current)."""
    nbs = notebooks()[:2]
    res, out = tmp_path / "results", tmp_path / "pub"
    out.mkdir()
    old = dict(source_hash=publish.notebook_hash(nbs[0]), figures=[], code_hash="older-code", git_commit="0" * 40)
    (out / f"{nbs[0].stem}.ipynb").write_text("{}")
    (out / "manifest.json").write_text(json.dumps(dict(code_hash="older-code", git_commit="0" * 40,
                                                       notebooks={nbs[0].stem: old})))
    (res / "executed").mkdir(parents=True)
    (res / "executed" / nbs[1].name).write_text("{}")
    (res / nbs[1].stem / "full").mkdir(parents=True)
    (res / nbs[1].stem / "full" / "metrics.json").write_text(json.dumps({"config": {"model": "smol"}}))
    man = publish.publish(nbs, seconds={nbs[1].stem: 1.0}, results=res, out=out)
    assert set(man["notebooks"]) == {nbs[0].stem, nbs[1].stem}
    assert man["notebooks"][nbs[0].stem]["code_hash"] == "older-code"
    assert man["notebooks"][nbs[1].stem]["code_hash"] == publish.code_hash()
    reasons = publish.stale(nbs, out)
    assert any(r.startswith(f"{nbs[0].stem}: the package code changed") for r in reasons)
    assert not any(r.startswith(nbs[1].stem) for r in reasons)
    assert publish.published_metrics(nbs[1].stem, out) == {"config": {"model": "smol"}}   # the README reads these
    assert publish.published_metrics(nbs[0].stem, out) is None


def test_a_notebook_is_published_with_the_code_it_started_with(tmp_path):
    """reproduce takes each notebook's code version when it starts: code edited while it ran is not what it ran."""
    nb = notebooks()[0]
    res, out = tmp_path / "results", tmp_path / "pub"
    (res / "executed").mkdir(parents=True)
    (res / "executed" / nb.name).write_text("{}")
    (res / nb.stem / "full").mkdir(parents=True)
    (res / nb.stem / "full" / "metrics.json").write_text(json.dumps({"config": {"model": "smol"}}))
    started = dict(git_commit="1" * 40, code_hash="the-code-it-ran")
    man = publish.publish([nb], results=res, out=out, versions={nb.stem: started})
    assert {k: man["notebooks"][nb.stem][k] for k in started} == started
    assert any(r.startswith(f"{nb.stem}: the package code changed") for r in publish.stale([nb], out))


def test_readme_tables_come_from_the_published_metrics(tmp_path, monkeypatch):
    """A fresh clone has no results/metrics.json (git-ignored): the README's tables read results/published/metrics/."""
    from qvlm.report import readme

    monkeypatch.setattr(readme, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(readme, "PUBLISHED", tmp_path / "pub")
    assert readme.deploy_section() == []
    row = dict(variant="rtn", setting="W4A4", n_eval=200, accuracy=0.285, packed_acc=0.26, agreement=0.64,
               layer_max_rel_err=1e-6)
    (tmp_path / "pub" / "metrics").mkdir(parents=True)
    (tmp_path / "pub" / "metrics" / "06_triton_deployment.json").write_text(
        json.dumps({"config": {"mode": "full"}, "metrics": {"accuracy": [row], "packed_backend": "reference"}}))
    text = "\n".join(readme.deploy_section())
    assert "| rtn | 28.5 / 26.0 (0.64) |" in text and "1.0e-06" in text


def test_a_resumed_notebook_says_so_in_the_runtime_table(tmp_path, monkeypatch):
    """`reproduce --resume` records how many stored rows existed when a notebook started; the README's runtime
    table then does not present that run's seconds as the notebook's whole runtime."""
    from qvlm.report import readme

    monkeypatch.setattr(readme, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(readme, "PUBLISHED", tmp_path / "pub")
    nb = notebooks()[0]
    res = tmp_path / "results"
    (res / "executed").mkdir(parents=True)
    (res / "executed" / nb.name).write_text("{}")
    (res / nb.stem / "full").mkdir(parents=True)
    (res / nb.stem / "full" / "metrics.json").write_text(json.dumps({"config": {"model": "smol"}}))
    started = dict(git_commit="1" * 40, code_hash="c", stored_rows_at_start=17)
    publish.publish([nb], results=res, out=tmp_path / "pub", seconds={nb.stem: 12.0}, versions={nb.stem: started})
    text = "\n".join(readme.runtime_section())
    assert f"| `{nb.stem}` |" in text and "12.0 (resumed: 17 stored rows at its start) |" in text
