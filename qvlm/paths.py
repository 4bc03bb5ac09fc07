"""Repository-root anchored paths, so notebooks and the CLI work from any working directory."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
TINY_DIR = DATA_DIR / "tiny"            # the shipped testbed checkpoint (save_pretrained layout)
RESULTS_DIR = REPO_ROOT / "results"
