"""Keep freed tensor memory in the process instead of handing it back to the OS (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with a fresh mmap and
unmaps it on free, and trims the heap top as soon as 128 KiB are free. A full-resolution forward pass
allocates and frees hundreds of such tensors, so every one of them is page-faulted in (and zeroed by the
kernel) again, which made full-resolution CPU inference spend about half its time in the kernel
(docs/results/design_measurements.md). The price is a higher resident peak: freed blocks stay mapped for
reuse. `mallopt` is the runtime
equivalent of MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_; set SEMI_LLIE_KEEP_FREED_MEMORY=0 to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Allocations below 1 GiB come from the heap; freed memory is trimmed only once 1 GiB is free at its top.
THRESHOLD_BYTES = 1 << 30
OPT_OUT_ENV = "SEMI_LLIE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Tune glibc malloc as above; returns whether it applied (False off glibc/Linux or when opted out)."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)
    )
