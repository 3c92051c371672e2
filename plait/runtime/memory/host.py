"""Giving host memory back to the system (Linux; elsewhere the fallbacks keep the same results).

Two things keep a CPU server's resident memory high after a long request: pages of the KV pool that
were written once stay mapped, and glibc's malloc keeps freed activation buffers in its heaps for
reuse instead of returning them. After a cache flush neither is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import numpy as np


def zeroed_pages(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """An anonymous private mapping and a uint8 array over it. Its pages read as zeros and become
    resident only when written (malloc could hand back heap memory that calloc must clear, touching it)."""
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would not reset
    return mapping, np.frombuffer(mapping, dtype=np.uint8, count=nbytes)


def release_pages(mapping: mmap.mmap) -> None:
    """Hand a `zeroed_pages` mapping's pages back to the system; it reads as zeros again."""
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)  # private anonymous memory: zero-filled on the next touch
    else:
        np.frombuffer(mapping, dtype=np.uint8).fill(0)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim_malloc() -> None:
    """Return glibc malloc's free heap memory to the system (malloc_trim)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(ctypes.c_size_t(0))
