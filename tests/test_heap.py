"""release_freed_memory returns to the OS what glibc's raised mmap threshold keeps resident."""

import platform
import subprocess
import sys

import pytest

from lightning_bayes.heap import release_freed_memory

GLIBC = platform.libc_ver()[0] == "glibc"

# one 30 MB block freed raises glibc's mmap threshold to 30 MB, so the next 20 MB blocks come from the heap; an 8 MB
# block made after them (as a sweep caches a factor) keeps the top of the heap, so freeing them returns nothing to
# the operating system: 1.2 GB stays resident, every run (without the 30 MB block they are mappings of their own,
# unmapped when freed; without the 8 MB one the freed top is trimmed)
SCRIPT = """
import torch
from lightning_bayes.heap import release_freed_memory, resident_bytes

def resident_mb():
    return resident_bytes() / 2**20

start = resident_mb()
big = torch.ones(30 * 2**20 // 4)
del big
blocks = [torch.ones(20 * 2**20 // 4) for _ in range(60)]
kept = torch.ones(8 * 2**20 // 4)
del blocks
grown = resident_mb()
assert release_freed_memory()
print(start, grown, resident_mb())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator and /proc (Linux, as in CI)")
def test_freed_transient_blocks_go_back_to_the_operating_system():
    start, grown, released = map(float, subprocess.run(
        [sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True
    ).stdout.split())
    assert grown - start > 1000  # the retention this guards against: the 1.2 GB freed stays resident
    assert released - start < 100  # and all of it goes back


def test_the_call_reports_whether_it_could_release():
    assert release_freed_memory() is GLIBC


def test_release_on_growth_trims_only_past_its_budget(monkeypatch):
    from lightning_bayes import heap

    # resident bytes as /proc/self/statm would report them: at construction, then per call (and after each release)
    resident = iter([1000, 1100, 1150, 1020, 1100, 900, 1030, 950, None])
    released = []
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(resident))
    monkeypatch.setattr(heap, "release_freed_memory", lambda: released.append(True) or True)
    release = heap.ReleaseOnGrowth(budget_bytes=120)
    # +100: keep; +150: release (1020 after it); +80: keep; 900: the baseline drops; +130 from it: release
    assert [release() for _ in range(5)] == [False, True, False, False, True]
    assert len(released) == 2
    assert release() is False  # no /proc: nothing done
    with pytest.raises(ValueError, match="budget_bytes must be a positive int; got 0"):
        heap.ReleaseOnGrowth(0)
