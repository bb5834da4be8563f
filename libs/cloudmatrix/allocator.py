"""glibc malloc settings for a serving process.

PyTorch on CPU allocates and frees megabyte-sized temporaries in every operator. With glibc's
defaults a block over 128 KiB (the threshold then adapts) may be mmap'ed and unmapped on free,
and free memory at the top of the heap is returned to the OS, so the same memory is faulted in
again on the next step: a die's decode attention spent about half its time in page faults here
(docs/performance.md). Serving processes keep it instead: blocks up to 32 MiB come from the heap,
and up to ``retain_bytes`` of free heap stays mapped. The cost is resident memory that does not
shrink after a peak (bounded by the peak plus ``retain_bytes``).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1   # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def tune_allocator(retain_bytes: int) -> bool:
    """Apply the settings above (``retain_bytes`` 0: leave glibc's defaults). Returns whether
    they took effect (False where the C library is not glibc)."""
    if retain_bytes <= 0:
        return False
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, retain_bytes))
