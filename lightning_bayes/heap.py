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
from collections.abc import Callable


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
