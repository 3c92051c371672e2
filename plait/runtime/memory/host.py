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
    """Zero a contiguous uint8 `buffer`, handing its whole pages back to the system (private anonymous
    memory reads back as zeros) and clearing the partial pages at its ends by hand."""
    assert buffer.dtype == np.uint8 and buffer.flags.c_contiguous
    start = buffer.ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE - start  # offsets of the whole pages inside
    last = (start + buffer.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE - start
    if _LIBC is None or not hasattr(_LIBC, "madvise") or last <= first or \
            _LIBC.madvise(ctypes.c_void_p(start + first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        buffer.fill(0)
        return
    buffer[:first] = 0
    buffer[last:] = 0


def trim_malloc() -> None:
    """Return glibc malloc's free heap memory to the system (malloc_trim)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(ctypes.c_size_t(0))
