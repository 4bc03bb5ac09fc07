"""environment.yml and pyproject.toml name the same dependencies with the same pins."""
import re
import tomllib

from qvlm.paths import REPO_ROOT


def _pins(lines):
    out = {}
    for l in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", l)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_matches_pyproject():
    py = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = _pins(py["dependencies"] + py["optional-dependencies"]["dev"])
    env_lines = [l.strip().lstrip("-").strip() for l in (REPO_ROOT / "environment.yml").read_text().splitlines()]
    env = _pins(env_lines)
    assert deps == env, f"pins differ: pyproject-only {set(deps.items()) - set(env.items())}, " \
                        f"environment.yml-only {set(env.items()) - set(deps.items())}"
    assert deps["torch"] == "2.13.0"


def test_required_packages_listed():
    py = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = set(_pins(py["dependencies"] + py["optional-dependencies"]["dev"]))
    need = {"torch", "transformers", "safetensors", "tokenizers", "jupyterlab", "papermill", "ipykernel",
            "matplotlib", "seaborn", "ipywidgets", "triton", "tqdm", "numpy", "pytest"}
    assert need <= names, need - names
