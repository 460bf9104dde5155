"""Keep large pixel buffers inside the process between images (glibc ``mallopt``).

Each radiograph allocates some 70 MB of short-lived arrays (the file's bytes, the decoded
pixels, the float32 window, Pillow's copy for the resize). glibc serves blocks this large with
``mmap`` and gives them back to the kernel when freed, so the next image faults every page in
again: on a 2000x2500 radiograph about 5 of its 16 ms of read + preprocess (measured here with
``benchmarks/infer.py``). Raising the ``mmap`` threshold and the trim threshold keeps that memory
in the heap for reuse, bounded by :data:`TRIM_THRESHOLD` of idle memory at the heap's top. Only
long-running analysers call this (the worker processes, ``triage-node infer`` and the
benchmark); on a C library without ``mallopt`` (musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 128 * 2**20  # blocks up to this size come from the heap (a 16384^2 image not)
TRIM_THRESHOLD = 256 * 2**20  # idle heap kept before it is returned to the kernel


def keep_large_buffers() -> bool:
    """Tune glibc's allocator for repeated large arrays; True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
