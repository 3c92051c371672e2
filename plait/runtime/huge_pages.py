"""Transparent huge pages for the large CPU tensors: the weights, the KV pool and the step buffers.

A CPU decode step streams its weights and the KV cache it attends over from memory: about 80 MB of
weights for the default model and, at 4,096 tokens of context, 94 MB of keys and values. On 4 KiB
pages that is some 40,000 pages a step, far more than the TLB covers, so every few kilobytes read
costs a page-table walk and the hardware prefetchers stop at each page's end. On 2 MiB pages the
same reads stream: single-stream decode through the server went from 104-109 to 109-130 tokens/s
on a 2-core Xeon (docs/performance-cpu.md, "Huge pages").

PyTorch's CPU allocator aligns allocations of 2 MiB or more to 2 MiB and asks the kernel for huge
pages (`madvise(MADV_HUGEPAGE)`) when THP_MEM_ALLOC_ENABLE=1 is in the environment at the process's
first such allocation (it reads the variable once). Importing `plait.runtime` sets it where the
kernel offers transparent huge pages (mode `always` or `madvise`), unless the variable is set
already: THP_MEM_ALLOC_ENABLE=0 keeps 4 KiB pages. The model processes the server spawns inherit
it. A process that made a large tensor before importing Plait keeps 4 KiB pages; the processes it
starts still get huge ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

ENV = "THP_MEM_ALLOC_ENABLE"
THP_MODE_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def kernel_mode(path: str = THP_MODE_PATH) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"), or None where it
    has none (not Linux, or no THP)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else None


def request_huge_pages(environ: MutableMapping[str, str] | None = None, path: str = THP_MODE_PATH) -> bool:
    """Ask PyTorch's CPU allocator for huge pages (THP_MEM_ALLOC_ENABLE=1) unless the variable is set
    or the kernel offers none; returns whether huge pages are asked for."""
    env = os.environ if environ is None else environ
    if ENV in env:
        return asked(env)
    if kernel_mode(path) not in ("always", "madvise"):
        return False
    env[ENV] = "1"
    return True


def asked(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether THP_MEM_ALLOC_ENABLE asks PyTorch's allocator for huge pages."""
    env = os.environ if environ is None else environ
    return env.get(ENV, "").strip() not in ("", "0")


def proc_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file (meminfo, smaps_rollup) in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def huge_page_bytes() -> int:
    """Bytes of this process's memory on transparent huge pages (0 where it cannot tell)."""
    return proc_bytes("/proc/self/smaps_rollup", "AnonHugePages") or 0
