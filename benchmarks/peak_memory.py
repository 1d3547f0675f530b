"""Peak memory and failure reporting of one benchmark worker process (a fresh interpreter per method).

Shared by the benchmarks that run each method in its own process (run as scripts from the repository root:
``python benchmarks/<name>.py``): peak memory is then per method, and a method that runs out of memory fails
in its own row.
"""

from __future__ import annotations

import ctypes
import gc
import resource

import torch

OOM_MESSAGES = ("can't allocate memory", "out of memory", "not enough memory", "cannot allocate memory")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that a later phase's allocations
    raise the resident set instead of reusing pages an earlier phase left resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a phase above its start, in MiB: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
    the resident set's high-water mark ``VmHWM``, reset to the current size through ``/proc/self/clear_refs``
    at the start (falling back to ``ru_maxrss``, a lifetime mark, where the reset is refused)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0
        self.resettable = True

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        gc.collect()
        release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            self.base = _status_kb("VmRSS") / 1024
        except OSError:
            self.resettable = False
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        if self.resettable:
            return _status_kb("VmHWM") / 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


def cap_data_memory(max_gb: float) -> None:
    """Let the process allocate at most ``max_gb`` more private writable memory (``RLIMIT_DATA``: heap and
    anonymous mappings) than it has now: a bigger allocation raises instead of triggering the OOM killer (which
    may pick another process). Not the address space: mapped libraries (CUDA's, in a CUDA build of torch) and the
    allocator's reserved per-thread arenas would count against that, failing runs that never use the memory."""
    if max_gb <= 0:
        return
    limit = _status_kb("VmData") * 1024 + int(max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def describe_error(error: BaseException, max_gb: float) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, MemoryError) or any(m in message.lower() for m in OOM_MESSAGES):
        return f"OOM (> {max_gb:g} GB)" if max_gb > 0 else "OOM"
    return f"{type(error).__name__}: {message[:100]}"
