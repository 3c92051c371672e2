"""Giving host memory back to the system (Linux, glibc; elsewhere these do nothing).

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

_MADV_DONTNEED = 4


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def release_pages(buffer: np.ndarray) -> None:
    """Drop the whole pages inside `buffer` (private anonymous memory reads back as zeros)."""
    if _LIBC is None or not hasattr(_LIBC, "madvise"):
        return
    start, end = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round inwards: never touch a neighbour's page
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def trim_malloc() -> None:
    """Return glibc malloc's free heap memory to the system (malloc_trim)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(ctypes.c_size_t(0))
