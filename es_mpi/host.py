"""Host-level facts and settings: CPU flags, and glibc's allocator.

Allocator: PyTorch on CPU allocates every activation with malloc.  glibc
serves blocks above a (dynamic) threshold with fresh mmaps and returns freed
heap tops to the OS, so a forward pass keeps faulting in and zeroing new
pages; in this project's VM a SmolLM2 prefill of 32 x 127 tokens took 4.2-4.3 s
that way and 3.1-3.4 s with freed memory kept for reuse (mmap threshold at
glibc's 32 MB maximum, no trimming).  Cost: the process keeps its peak heap
instead of returning it, which the peak-memory figures already count.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD = 32 << 20          # glibc's maximum on 64-bit
TRIM_THRESHOLD = (1 << 31) - 1     # an int: never trim in practice
_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory for reuse (glibc only; a no-op elsewhere).  Call
    once, early: before the model loads."""
    global _tuned
    if _tuned:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    _tuned = (bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
              and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _tuned


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
