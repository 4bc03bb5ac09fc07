import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.pop("QVLM_ROW_CACHE", None)   # a user's row cache (qvlm.experiments.RowCache) must not answer the tests' runs

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in the CPU interpreter. The variable must be set before `kernels` is first
# imported (triton.jit reads it), and importing qvlm.cli / qvlm.deploy imports kernels, so it is set here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    # the notebooks first: under pytest-xdist (make test: --dist loadfile --no-loadscope-reorder) their file is one
    # worker's chain of ~10 minutes, so it starts at once while the other worker takes the unit tests
    items.sort(key=lambda item: "notebooks" not in item.keywords)        # stable: the order within each stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
