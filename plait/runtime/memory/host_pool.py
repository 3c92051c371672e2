"""The lower KV tiers: a host pool (second tier) and a file store (third tier).

Both hold KV rows in the device pool's own format (dtype, row layout, int8 scales included), so a
move between tiers is a copy of bytes and the KV read back is bit-identical to what was written.

- `HostKVPool`: K and V per layer, `[num_slots + 1, num_kv_heads, row_size]`, like the device pool,
  with its own slot allocator. On a CUDA device the buffers are pinned so copies run without
  staging; on the CPU they are an anonymous mapping (resident only as written).
- `FileStorage`: one file per stored run of tokens, `[2, num_layers, num_tokens, num_kv_heads,
  row_size]`; a `StorageRef` names a slice of a file, so splitting a stored run copies nothing. A
  file is deleted when no reference to it is left.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from plait.runtime.memory.host import release_pages, zeroed_pages
from plait.runtime.memory.kv_pool import KVPool, SlotAllocator


class HostKVPool:
    """Host copies of device KV rows. Copies block the calling thread until the bytes have moved."""

    def __init__(self, device_pool: KVPool, num_slots: int):
        assert num_slots > 0
        self.device_pool = device_pool
        self.num_slots = num_slots
        self.allocator = SlotAllocator(num_slots, "cpu")
        # 8-bit floats have no index kernels everywhere; their bytes do (the copies move bytes anyway).
        raw = (lambda t: t.view(torch.uint8)) if device_pool.k_buffers[0].element_size() == 1 else (lambda t: t)
        self.dev_k = [raw(b) for b in device_pool.k_buffers]
        self.dev_v = [raw(b) for b in device_pool.v_buffers]
        k0 = self.dev_k[0]
        shape = (num_slots + 1, *k0.shape[1:])  # [num_slots + 1, num_kv_heads, row_size]
        num_layers = device_pool.num_layers
        self.dtype = k0.dtype
        self.on_cuda = k0.device.type == "cuda"
        self._host = None
        if self.on_cuda:
            buffers = torch.empty((2, num_layers, *shape), dtype=self.dtype, pin_memory=True)
        else:
            self._host, pages = zeroed_pages(2 * num_layers * math.prod(shape) * k0.element_size())
            buffers = torch.from_numpy(pages).view(self.dtype).view(2, num_layers, *shape)
        self.k_buffers, self.v_buffers = list(buffers[0].unbind()), list(buffers[1].unbind())
        self._copy_stream = torch.cuda.Stream(device=k0.device) if self.on_cuda else None
        self._staging: torch.Tensor | None = None  # pinned, for loads (the loader thread only)

    @property
    def bytes_per_token(self) -> int:
        k0 = self.k_buffers[0]
        return 2 * len(self.k_buffers) * k0[0].numel() * k0.element_size()

    def backup(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Device rows `device_slots` -> host rows `host_slots` (both [n] int64)."""
        assert device_slots.numel() == host_slots.numel()
        dev = device_slots.to(self.dev_k[0].device)
        for src, dst in ((self.dev_k, self.k_buffers), (self.dev_v, self.v_buffers)):
            for layer_src, layer_dst in zip(src, dst):
                # rows: [n, num_kv_heads, row_size]
                layer_dst.index_copy_(0, host_slots, layer_src.index_select(0, dev).to("cpu"))

    def load(self, host_slots: torch.Tensor, device_slots: torch.Tensor, *, cancelled=lambda: False) -> bool:
        """Host rows -> device rows, layer by layer; stops early (returns False) once `cancelled()`."""
        assert device_slots.numel() == host_slots.numel()
        if self._copy_stream is not None:
            return self._load_cuda(host_slots, device_slots, cancelled)
        for layer in range(len(self.k_buffers)):
            if cancelled():
                return False
            for src, dst in ((self.k_buffers, self.dev_k), (self.v_buffers, self.dev_v)):
                dst[layer].index_copy_(0, device_slots, src[layer].index_select(0, host_slots))
        return True

    def _load_cuda(self, host_slots: torch.Tensor, device_slots: torch.Tensor, cancelled) -> bool:
        """Gather each layer's rows into one of two pinned staging buffers while the previous
        layer's crosses to the device on the copy stream."""
        n = host_slots.numel()
        if self._staging is None or self._staging.shape[2] < n:
            # [2 buffers, K and V, n, num_kv_heads, row_size]
            self._staging = torch.empty((2, 2, n, *self.k_buffers[0].shape[1:]), dtype=self.dtype, pin_memory=True)
        stream, device = self._copy_stream, self.dev_k[0].device
        events: list[torch.cuda.Event | None] = [None, None]
        with torch.cuda.stream(stream):
            dev = device_slots.to(device, non_blocking=True)
            for layer in range(len(self.k_buffers)):
                if cancelled():
                    stream.synchronize()
                    return False
                b = layer % 2
                if events[b] is not None:
                    events[b].synchronize()  # the copy out of this buffer is done
                stage = self._staging[b, :, :n]
                torch.index_select(self.k_buffers[layer], 0, host_slots, out=stage[0])
                torch.index_select(self.v_buffers[layer], 0, host_slots, out=stage[1])
                self.dev_k[layer].index_copy_(0, dev, stage[0].to(device, non_blocking=True))
                self.dev_v[layer].index_copy_(0, dev, stage[1].to(device, non_blocking=True))
                events[b] = torch.cuda.Event()
                events[b].record(stream)
        stream.synchronize()
        return True

    def read(self, host_slots: torch.Tensor) -> np.ndarray:
        """The rows as one array `[2, num_layers, n, num_kv_heads, row_size]` (for the file tier)."""
        k = torch.stack([b.index_select(0, host_slots) for b in self.k_buffers])
        v = torch.stack([b.index_select(0, host_slots) for b in self.v_buffers])
        return _as_numpy(torch.stack([k, v]))

    def write(self, host_slots: torch.Tensor, rows: np.ndarray) -> None:
        data = _from_numpy(rows, self.dtype)  # [2, num_layers, n, num_kv_heads, row_size]
        for layer in range(len(self.k_buffers)):
            self.k_buffers[layer].index_copy_(0, host_slots, data[0, layer])
            self.v_buffers[layer].index_copy_(0, host_slots, data[1, layer])

    def load_rows(self, rows: np.ndarray, device_slots: torch.Tensor, *, cancelled=lambda: False) -> bool:
        """Stored rows (`read`'s layout) -> device rows, layer by layer; False if cancelled."""
        device = self.dev_k[0].device
        data = _from_numpy(rows, self.dtype)
        dev = device_slots.to(device)
        for layer in range(len(self.k_buffers)):
            if cancelled():
                return False
            self.dev_k[layer].index_copy_(0, dev, data[0, layer].to(device))
            self.dev_v[layer].index_copy_(0, dev, data[1, layer].to(device))
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return True

    def release_memory(self) -> None:
        if self._host is not None:
            release_pages(self._host)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: move the bytes as 16-bit integers (the file tier stores bytes anyway).
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.contiguous().numpy()


def _from_numpy(rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(rows))
    return t.view(dtype) if t.dtype != dtype else t


@dataclass(frozen=True)
class StorageRef:
    """Tokens `[start, start + length)` of a stored file."""

    path: str
    start: int
    length: int

    def slice(self, offset: int, length: int) -> StorageRef:
        assert 0 <= offset and offset + length <= self.length
        return StorageRef(self.path, self.start + offset, length)


class FileStorage:
    """KV runs in files under one folder (a temporary one, removed on close, unless given)."""

    name = "file"

    def __init__(self, folder: str | None = None):
        self._own_folder = folder is None
        self.folder = folder or tempfile.mkdtemp(prefix="plait-hicache-")
        os.makedirs(self.folder, exist_ok=True)
        self._refs: dict[str, int] = {}  # path -> live references
        self._sizes: dict[str, int] = {}  # path -> bytes of KV
        self._lock = threading.Lock()  # the loader thread reads while the scheduler writes
        self.bytes_stored = 0

    def write(self, rows: np.ndarray) -> StorageRef:
        path = os.path.join(self.folder, uuid.uuid4().hex + ".npy")
        np.save(path, rows)
        with self._lock:
            self._refs[path] = 1
            self._sizes[path] = rows.nbytes
            self.bytes_stored += rows.nbytes
        return StorageRef(path, 0, rows.shape[2])

    def read(self, ref: StorageRef) -> np.ndarray:
        """`[2, num_layers, ref.length, num_kv_heads, row_size]`."""
        data = np.load(ref.path, mmap_mode="r")
        return np.array(data[:, :, ref.start : ref.start + ref.length])

    def add_ref(self, ref: StorageRef) -> None:
        with self._lock:
            self._refs[ref.path] += 1

    def drop_ref(self, ref: StorageRef) -> None:
        with self._lock:
            self._refs[ref.path] -= 1
            if self._refs[ref.path] > 0:
                return
            del self._refs[ref.path]
            self.bytes_stored -= self._sizes.pop(ref.path)
        try:
            os.unlink(ref.path)
        except OSError:
            pass

    @property
    def num_files(self) -> int:
        return len(self._refs)

    def close(self) -> None:
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


STORAGE_BACKENDS = {"file": FileStorage}
