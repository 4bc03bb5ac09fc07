"""qvlm.core.cost: the peak-memory unit of the search cost."""
import sys

import pytest
import torch

from qvlm.core.cost import peak_memory


def _churn(n: int = 8, numel: int = 2_000_000):
    for _ in range(3):
        xs = [torch.ones(numel) for _ in range(n)]
        del xs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS through /proc is Linux's")
def test_cpu_peak_shows_what_a_search_allocates_after_an_earlier_one_freed_as_much():
    """A second search in one process reuses the memory the first freed; the peak must still count it (the CPU
    rows of notebook 03's full run read 0 bytes before the allocator's free memory was released at entry)."""
    _churn()                                         # an earlier "search": 64 MB allocated and freed
    with peak_memory("cpu") as mem:
        _churn()
    assert mem["kind"] == "cpu_peak_rss_delta"
    assert mem["bytes"] >= 0.75 * 8 * 2_000_000 * 4  # 8 tensors of 8 MB alive at once
