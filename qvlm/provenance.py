"""Which code computed a result: the package + kernels hash and the git commit (published notebooks, bench tables
and the grid's row cache record them; equal hash = the same code, uncommitted edits included)."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from .paths import REPO_ROOT

CODE_DIRS = ("qvlm", "kernels")


def code_hash(root: Path = REPO_ROOT) -> str:
    """sha256 over every .py file of the package and the kernels (path + content), in sorted order."""
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def git_commit(root: Path = REPO_ROOT) -> str:
    p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


def code_version(root: Path = REPO_ROOT) -> dict:
    """{git_commit, code_hash}: the code a result is computed with (uncommitted edits count in the hash)."""
    return dict(git_commit=git_commit(root), code_hash=code_hash(root))
