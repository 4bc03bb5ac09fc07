"""Small shared helpers: seeding, atomic writes, typed artifacts."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .errors import QVLMError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temp file + rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp directory next to `path`; on success rename it to `path`, on error remove it.

    Used for every command that writes a directory (quantized model, packed checkpoint), so a failure
    never leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_artifact(kind: str, obj, path: str | os.PathLike) -> Path:
    """torch.save `{"kind": kind, **asdict(obj)}` (a dataclass of plain types and tensors) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"kind": kind, **asdict(obj)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_artifact(kind: str, cls, path: str | os.PathLike, writer: str):
    """Inverse of save_artifact: `cls(**fields)`; a missing, corrupt or other-kind file is a one-line QVLMError
    naming `writer`, the function that writes this kind."""
    try:
        d = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise QVLMError(f"{path} does not exist", f"pass a file written by {writer}") from None
    except Exception as e:       # truncated / not a torch file
        raise QVLMError(f"{path} is not a readable {kind} artifact ({type(e).__name__})",
                        f"rewrite it with {writer}") from None
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise QVLMError(f"{path} is not a {kind} artifact", f"pass a file written by {writer}")
    d.pop("kind")
    return cls(**d)


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checksums of converted weights, wheels and exports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
