"""Search cost in three units, measured around any piece of code: seconds, block passes, peak memory.

    with measure(device) as cost:
        methods.quantize(...)
    cost.wall_seconds, cost.cpu_seconds, cost.linear_fwd, cost.linear_bwd, cost.peak_memory_bytes

seconds       wall clock (time.perf_counter) and CPU time of this process (time.process_time; on a busy machine
              the CPU time is the fairer of the two, and both are noisy: compare them side by side in one run).
passes        forward evaluations of QuantLinear layers and of transformer layers (blocks), and those of them whose
              output requires grad (each will also be traversed by a backward pass). Counted, so independent of
              the machine's load.
peak memory   see `peak_memory`: CUDA max allocated on a GPU, the peak-RSS increase on Linux CPUs.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
import time
from dataclasses import dataclass

import torch


@dataclass
class Cost:
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    linear_fwd: int = 0               # QuantLinear forwards
    linear_bwd: int = 0               # of which a backward will traverse the layer (output requires grad)
    block_fwd: int = 0                # transformer-layer forwards (FP copies included: they are work too)
    block_bwd: int = 0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""

    @property
    def linear_passes(self) -> int:
        """Forward + backward QuantLinear evaluations (the machine-independent cost unit)."""
        return self.linear_fwd + self.linear_bwd

    @property
    def block_passes(self) -> int:
        """Forward + backward transformer-layer evaluations."""
        return self.block_fwd + self.block_bwd


@contextlib.contextmanager
def count_passes(layer_type: type, block_types: tuple = ()):
    """Count forwards of `layer_type` modules and of `block_types` modules inside the `with` (and those of them
    whose output requires grad, i.e. that a backward will traverse)."""
    n = {"fwd": 0, "bwd": 0, "block_fwd": 0, "block_bwd": 0}

    def hook(mod, args, out):
        y = out[0] if isinstance(out, (tuple, list)) and out else out
        grad = int(isinstance(y, torch.Tensor) and y.requires_grad)
        if isinstance(mod, layer_type):
            n["fwd"] += 1
            n["bwd"] += grad
        elif block_types and isinstance(mod, block_types):
            n["block_fwd"] += 1
            n["block_bwd"] += grad

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield n
    finally:
        handle.remove()


@contextlib.contextmanager
def measure(device, layer_type: type, block_types: tuple = ()):
    """Yield a Cost filled on exit (wall and CPU seconds, passes, peak memory)."""
    cost = Cost()
    with peak_memory(device) as mem, count_passes(layer_type, block_types) as n:
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        yield cost
        cost.wall_seconds, cost.cpu_seconds = time.perf_counter() - t_wall, time.process_time() - t_cpu
    cost.linear_fwd, cost.linear_bwd, cost.block_fwd, cost.block_bwd = n["fwd"], n["bwd"], n["block_fwd"], n["block_bwd"]
    cost.peak_memory_bytes, cost.peak_memory_kind = mem["bytes"], mem["kind"]


def _libc():
    with contextlib.suppress(OSError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c"))
    return None


_LIBC = _libc()


def release_free_memory() -> None:
    """Hand the memory the C allocator keeps from freed tensors back to the OS (glibc `malloc_trim(0)`; a no-op
    elsewhere). Without it a search that reuses what an earlier search freed raises no RSS: its peak reads ~0."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _proc_status(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return None


@contextlib.contextmanager
def peak_memory(device):
    """Measure peak memory of the enclosed code; yields a dict filled on exit with "bytes" and "kind":

    cuda_max_allocated : torch.cuda.max_memory_allocated() after reset_peak_memory_stats() (absolute, model included)
    cpu_peak_rss_delta : Linux peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS at entry, the
                         allocator's freed memory released first (`release_free_memory`), so that what the enclosed
                         code allocates shows even where an earlier search of the same process freed as much
    cpu_maxrss_delta   : fallback without /proc: getrusage ru_maxrss minus RSS-high-water at entry (0 if the process
                         had already peaked higher before)"""
    rec = {"bytes": 0, "kind": ""}
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        yield rec
        torch.cuda.synchronize(dev)
        rec.update(bytes=int(torch.cuda.max_memory_allocated(dev)), kind="cuda_max_allocated")
        return
    release_free_memory()
    reset = False
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                          # reset VmHWM to the current RSS (Linux >= 4.0)
        reset = True
    start_rss = _proc_status("VmRSS")
    if reset and start_rss is not None:
        yield rec
        rec.update(bytes=max(0, (_proc_status("VmHWM") or 0) - start_rss), kind="cpu_peak_rss_delta")
        return
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield rec
    rec.update(bytes=max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start), kind="cpu_maxrss_delta")
