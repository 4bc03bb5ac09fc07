"""Kernel tests run on CUDA when present, else in Triton's CPU interpreter (correctness only, never timing).

TRITON_INTERPRET must be set before `kernels` (and triton.jit) is imported, so it is set here, at conftest import.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402  (must come after the environment variable)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if getattr(kernels, "__file__", None) is None:   # only the tests/kernels directory was found, as a namespace package
    raise pytest.UsageError("the `kernels` package is not importable: `pip install -e .` (or run "
                            "`python -m pytest` from the repository root)")

if DEVICE == "cpu" and not kernels.INTERPRET:
    raise pytest.UsageError("kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
                            "run the kernel tests in their own pytest process or export TRITON_INTERPRET=1")


@pytest.fixture
def device():
    """Where kernel inputs live: 'cuda' or 'cpu' (interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
