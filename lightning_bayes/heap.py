"""Handing the C heap's freed pages back to the operating system (glibc's ``malloc_trim``).

glibc serves a block larger than its mmap threshold with a mapping of its own, unmapped when freed, but it
raises that threshold to the size of every such block freed (up to 32 MB). From then on tensors of a few
to tens of MB come from the heap; a small long-lived allocation made while one is alive (a cached factor,
a tensor's metadata) sits behind it, and the next block of that size often does not fit the hole left below
and goes above. Resident memory then grows by up to one transient block per step: a null-space Laplace sweep
over MNIST (per-batch Jacobians of 28 MB) reached 16.7 GB resident for a posterior state of 0.7 GB.
``malloc_trim(0)`` returns the free pages inside the heap as well as at its top (``madvise``), leaving the
allocator's settings as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

from .checks import is_int


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the operating system; False where the C library is not glibc (the
    call then does nothing). Costs a walk over the heap's free blocks: call it every few large steps, not per
    tensor."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_bytes() -> int | None:
    """The process's resident set in bytes (``/proc/self/statm``), or None where there is no ``/proc``."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ReleaseOnGrowth:
    """Call :func:`release_freed_memory` once the resident set has grown by more than ``budget_bytes`` since the
    last release: a loop that frees large blocks every step then keeps at most about that much of them resident
    whatever their size, and trims only as often as it must (a trim walks the heap: 10 to 20 ms on a fragmented
    one, whatever it frees). Call it once per step; it returns whether it released.

    Args:
        budget_bytes: the growth allowed between releases.
    """

    def __init__(self, budget_bytes: int) -> None:
        if not is_int(budget_bytes) or budget_bytes < 1:
            raise ValueError(f"budget_bytes must be a positive int; got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self._baseline = resident_bytes()

    def __call__(self) -> bool:
        resident = resident_bytes()
        if resident is None or self._baseline is None:
            return False
        if resident - self._baseline <= self.budget_bytes:
            self._baseline = min(self._baseline, resident)
            return False
        released = release_freed_memory()
        self._baseline = resident_bytes() if released else resident
        return released
