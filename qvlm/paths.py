"""Repository-root anchored paths, so notebooks and the CLI work from any working directory."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
TINY_DIR = DATA_DIR / "tiny"            # the shipped testbed checkpoint (save_pretrained layout)
RESULTS_DIR = REPO_ROOT / "results"
ROWS_DIR = RESULTS_DIR / "rows"          # finished grid rows kept for resuming (qvlm.experiments.RowCache)
PUBLISHED = RESULTS_DIR / "published"    # committed full-mode runs: executed notebooks, metrics/<stem>.json, figures
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebooks(only: str = "") -> list[Path]:
    """notebooks/NN_*.ipynb in order; `only`: comma-separated numbers or stems (e.g. "00,05")."""
    nbs = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        keep = {k.strip() for k in only.split(",")}
        nbs = [p for p in nbs if p.name[:2] in keep or p.stem in keep]
    return nbs


# The kernelspec and language_info JupyterLab writes for the kernel `make install` registers (`ipykernel install
# --name python3`): notebooks committed with exactly these open unmodified (tests/test_notebook_hygiene.py).
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3", "version": "3.11.7"}
