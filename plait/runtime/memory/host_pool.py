"""The lower KV tiers: a host pool (second tier) and a file store (third tier).

Both hold KV rows in the device pool's own format (dtype, row layout, int8 scales included), so a
move between tiers is a copy of bytes and the KV read back is bit-identical to what was written.

- `HostKVPool`: one array `[num_slots + 1, 2, num_layers, num_kv_heads, row_size]` (token-major, so
  a run of slots is one block for the copy engine), with its own slot allocator. On a CUDA device
  it is pinned; on the CPU it is an anonymous mapping (resident only as written).
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
    """Host copies of device KV rows, token-major: `rows[slot]` is `[2 (K, V), num_layers,
    num_kv_heads, row_size]`, so the KV of a run of consecutive slots is one block of memory.

    On the CPU a copy is a gather and a scatter between arrays and blocks the caller. On a CUDA
    device the host rows are pinned and the copy engine moves them with no CPU copy in between:

    - A load splits the host slots into runs of consecutive ids (the allocator hands slots out in
      runs and a node's slots are freed together, so a node's rows are a few runs), copies each run,
      every layer at once, from pinned memory into a device staging buffer, then scatters it into
      the device slots on the device. Host slots in runs too short for the copy engine (under
      `MIN_RUN_BYTES` on average) are gathered on the CPU into pinned memory and sent in one copy.
    - A backup gathers the device rows on the compute stream (so later kernels that reuse those
      slots run after it) and copies them to their host runs on the copy stream without waiting.
      Loads run on the same copy stream, so they come after; CPU reads of host rows first wait for
      the last backup.
    """

    MIN_RUN_BYTES = 64 << 10  # shortest mean run the copy engine takes run by run
    STAGE_BYTES = 64 << 20  # device staging per chunk of a copy
    MAX_BACKUP_STAGING = 2 << 30  # staged backup bytes in flight before a backup waits for its copies

    def __init__(self, device_pool: KVPool, num_slots: int):
        assert num_slots > 0
        self.device_pool = device_pool
        self.num_slots = num_slots
        self.allocator = SlotAllocator(num_slots, "cpu")
        # 8-bit floats have no index kernels everywhere; their bytes do (the copies move bytes anyway).
        raw = (lambda t: t.view(torch.uint8)) if device_pool.k_buffers[0].element_size() == 1 else (lambda t: t)
        self.dev_k = [raw(b) for b in device_pool.k_buffers]
        self.dev_v = [raw(b) for b in device_pool.v_buffers]
        self.dev_all = raw(device_pool.buffer)  # [2, num_layers, slots, num_kv_heads, row_size]
        k0 = self.dev_k[0]
        self.num_layers = device_pool.num_layers
        self.token_shape = (2, self.num_layers, *k0.shape[1:])  # [K and V, layers, num_kv_heads, row_size]
        self.dtype = k0.dtype
        self.on_cuda = k0.device.type == "cuda"
        self._host = None
        if self.on_cuda:
            self.rows = torch.empty((num_slots + 1, *self.token_shape), dtype=self.dtype, pin_memory=True)
        else:
            self._host, pages = zeroed_pages((num_slots + 1) * math.prod(self.token_shape) * k0.element_size())
            self.rows = torch.from_numpy(pages).view(self.dtype).view(num_slots + 1, *self.token_shape)
        self._copy_stream = torch.cuda.Stream(device=k0.device) if self.on_cuda else None
        if self.on_cuda:
            # Waiting for a backup's copies also waits for the compute queued before its gather (a
            # whole forward pass, perhaps), so the staging may take a quarter of the memory that
            # the KV pool left free before a backup waits.
            self.max_backup_staging = min(self.MAX_BACKUP_STAGING, torch.cuda.mem_get_info(k0.device)[0] // 4)
        self._backup_done: torch.cuda.Event | None = None  # the last backup's copies, on the copy stream

    @property
    def bytes_per_token(self) -> int:
        return math.prod(self.token_shape) * self.rows.element_size()

    def _chunks(self, n: int):
        step = max(1, self.STAGE_BYTES // self.bytes_per_token)
        return ((c, min(c + step, n)) for c in range(0, n, step))

    def _by_runs(self, runs: list, n: int) -> bool:
        return n * self.bytes_per_token >= self.MIN_RUN_BYTES * len(runs)

    def backup(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Device rows `device_slots` -> host rows `host_slots` (both [n] int64)."""
        assert device_slots.numel() == host_slots.numel()
        if host_slots.numel() == 0:
            return
        dev = device_slots.to(self.dev_k[0].device)
        if not self.on_cuda:
            for layer in range(self.num_layers):
                self.rows[:, 0, layer].index_copy_(0, host_slots, self.dev_k[layer].index_select(0, dev))
                self.rows[:, 1, layer].index_copy_(0, host_slots, self.dev_v[layer].index_select(0, dev))
            return
        compute, stream = torch.cuda.current_stream(dev.device), self._copy_stream
        gather_on_cpu = not self._by_runs(slot_runs(host_slots), host_slots.numel())
        staged = 0
        for c0, c1 in self._chunks(host_slots.numel()):
            # the gather runs on the compute stream: kernels queued later may overwrite the slots
            stage = self._gather_device(dev[c0:c1])
            gathered = torch.cuda.Event()
            gathered.record(compute)
            stream.wait_event(gathered)
            if gather_on_cpu:
                pinned = torch.empty(stage.shape, dtype=self.dtype, pin_memory=True)
                with torch.cuda.stream(stream):
                    pinned.copy_(stage, non_blocking=True)
                stream.synchronize()
                self.rows.index_copy_(0, host_slots[c0:c1], pinned)
                continue
            with torch.cuda.stream(stream):
                for off, first, length in slot_runs(host_slots[c0:c1]):
                    self.rows[first : first + length].copy_(stage[off : off + length], non_blocking=True)
            stage.record_stream(stream)  # its memory is not reused until the copies are done
            staged += stage.numel() * stage.element_size()
            if staged >= self.max_backup_staging:
                stream.synchronize()
                staged = 0
        done = torch.cuda.Event()
        done.record(stream)
        self._backup_done = done

    def _gather_device(self, dev: torch.Tensor) -> torch.Tensor:
        """The device rows of `dev`, token-major: `[n, 2, num_layers, num_kv_heads, row_size]`."""
        return self.dev_all.index_select(2, dev).permute(2, 0, 1, 3, 4).contiguous()

    def _scatter_device(self, stage: torch.Tensor, dev: torch.Tensor) -> None:
        """Token-major rows `stage` into the device slots `dev`, every layer in one kernel."""
        self.dev_all.index_copy_(2, dev, stage.permute(1, 2, 0, 3, 4))

    def wait_backups(self) -> None:
        """Block until every backup so far is in host memory (before the CPU reads host rows)."""
        event = self._backup_done
        if event is not None:
            event.synchronize()

    def load(self, host_slots: torch.Tensor, device_slots: torch.Tensor, *, cancelled=lambda: False) -> bool:
        """Host rows -> device rows; stops early (returns False) once `cancelled()`, which is asked
        between layers (CPU) or between chunks of tokens (CUDA)."""
        assert device_slots.numel() == host_slots.numel()
        if host_slots.numel() == 0:
            return True
        if self.on_cuda:
            return self._load_cuda(host_slots, device_slots, cancelled)
        for layer in range(self.num_layers):
            if cancelled():
                return False
            self.dev_k[layer].index_copy_(0, device_slots, self.rows[:, 0, layer].index_select(0, host_slots))
            self.dev_v[layer].index_copy_(0, device_slots, self.rows[:, 1, layer].index_select(0, host_slots))
        return True

    def _load_cuda(self, host_slots: torch.Tensor, device_slots: torch.Tensor, cancelled) -> bool:
        stream, device = self._copy_stream, self.dev_k[0].device
        by_runs = self._by_runs(slot_runs(host_slots), host_slots.numel())
        if not by_runs:
            self.wait_backups()  # the CPU gather reads host rows
        stage = None
        with torch.cuda.stream(stream):
            dev = device_slots.to(device, non_blocking=True)
            for c0, c1 in self._chunks(host_slots.numel()):
                if cancelled():
                    stream.synchronize()
                    return False
                m = c1 - c0
                if stage is None:  # one buffer for every chunk: the stream orders its reuse
                    stage = torch.empty((m, *self.token_shape), dtype=self.dtype, device=device)
                if by_runs:
                    for off, first, length in slot_runs(host_slots[c0:c1]):
                        stage[off : off + length].copy_(self.rows[first : first + length], non_blocking=True)
                else:
                    stage[:m].copy_(self.rows.index_select(0, host_slots[c0:c1]).pin_memory(), non_blocking=True)
                self._scatter_device(stage[:m], dev[c0:c1])
        stream.synchronize()
        return True

    def read(self, host_slots: torch.Tensor) -> np.ndarray:
        """The rows as one array `[2, num_layers, n, num_kv_heads, row_size]` (for the file tier)."""
        self.wait_backups()
        return _as_numpy(self.rows.index_select(0, host_slots).permute(1, 2, 0, 3, 4))

    def write(self, host_slots: torch.Tensor, rows: np.ndarray) -> None:
        self.wait_backups()  # a backup still copying into reused slots would land after this write
        data = _from_numpy(rows, self.dtype)  # [2, num_layers, n, num_kv_heads, row_size]
        self.rows.index_copy_(0, host_slots, data.permute(2, 0, 1, 3, 4))

    def load_rows(self, rows: np.ndarray, device_slots: torch.Tensor, *, cancelled=lambda: False) -> bool:
        """Stored rows (`read`'s layout) -> device rows, layer by layer; False if cancelled."""
        device = self.dev_k[0].device
        data = _from_numpy(rows, self.dtype)
        dev = device_slots.to(device)
        for layer in range(self.num_layers):
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


def slot_runs(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """`(offset, first slot, length)` of each run of consecutive ids in `slots` (a CPU tensor)."""
    ids = slots.numpy()
    if ids.size == 0:
        return []
    starts = np.flatnonzero(np.diff(ids) != 1) + 1
    offsets = np.concatenate(([0], starts))
    lengths = np.diff(np.concatenate((offsets, [ids.size])))
    return [(int(o), int(ids[o]), int(n)) for o, n in zip(offsets, lengths)]


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
