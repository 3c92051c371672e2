"""The three memory levels below the scheduler: the KV pool, the req_to_token table, the allocators.

Slot 0 of the KV pool is a dummy that padded tokens write into; real slots are 1..num_slots.
Row 0 of req_to_token is likewise reserved for padding. Prefix sharing copies nothing: two
requests whose req_to_token rows hold the same slot ids share KV.
"""

from __future__ import annotations

import math

import torch

from plait.runtime.memory.host import release_pages, zeroed_pages


class SlotAllocator:
    """A free list of KV slot ids (page size 1).

    `alloc(n)` returns `None` when fewer than n slots are free; the caller evicts from the prefix
    cache and retries. Freed slots go to the back so recently freed KV is reused last.
    """

    def __init__(self, num_slots: int, device: torch.device | str = "cpu"):
        assert num_slots > 0
        self.num_slots = num_slots
        self.device = torch.device(device)
        self._free = torch.arange(1, num_slots + 1, dtype=torch.int64, device=self.device)

    @property
    def num_free_slots(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        assert n >= 0
        if n > self._free.numel():
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        self._free = torch.cat([self._free, slots.to(self.device, torch.int64, non_blocking=True)])

    def reset(self) -> None:
        self._free = torch.arange(1, self.num_slots + 1, dtype=torch.int64, device=self.device)

    def free_slots(self) -> torch.Tensor:
        """A copy of the free list, for integrity checks."""
        return self._free.clone()


class ReqToTokenPool:
    """`req_to_token[req_pool_idx, pos] -> kv_slot`; rows are handed out from a free list."""

    def __init__(self, num_rows: int, max_context_len: int, device: torch.device | str = "cpu"):
        self.num_rows = num_rows
        self.max_context_len = max_context_len
        # +1: row 0 is the padding row.
        self.req_to_token = torch.zeros((num_rows + 1, max_context_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(num_rows, 0, -1))
        # Under tensor parallelism rank 0 records every write here, for the other ranks to replay
        # (plait/runtime/distributed/lockstep.py); None otherwise.
        self.journal = None

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, req_pool_idx: int) -> None:
        assert 0 < req_pool_idx <= self.num_rows and req_pool_idx not in self._free_rows
        self._free_rows.append(req_pool_idx)

    def write(self, req_pool_idx: int, start: int, slots: torch.Tensor) -> None:
        assert 0 <= start and start + slots.numel() <= self.max_context_len
        self.req_to_token[req_pool_idx, start : start + slots.numel()] = slots
        if self.journal is not None:
            self.journal.row(req_pool_idx, start, slots)

    def write_points(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """`req_to_token[rows[i], positions[i]] = slots[i]` (one new token per request)."""
        self.req_to_token[rows, positions] = slots
        if self.journal is not None:
            self.journal.points(rows, positions, slots)

    def reset(self) -> None:
        self._free_rows = list(range(self.num_rows, 0, -1))


class KVPool:
    """One preallocated K and one V tensor per layer, `[num_slots + 1, num_kv_heads, head_dim]`."""

    def __init__(
        self,
        *,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        shape = (num_slots + 1, num_kv_heads, self.row_size(head_dim, dtype))
        if torch.device(device).type == "cpu":
            # One block of anonymous pages: the kernel maps them lazily, so the pool costs resident
            # memory only for the pages KV was written to (torch.zeros would touch every page now),
            # and `release_memory` can hand them back.
            self._host, pages = zeroed_pages(2 * num_layers * math.prod(shape) * dtype.itemsize)
            buffers = torch.from_numpy(pages).view(dtype).view(2, num_layers, *shape)
        else:
            self._host = None
            buffers = torch.zeros((2, num_layers, *shape), dtype=dtype, device=device)
        # `buffer` is every layer's K and V, [2, num_layers, num_slots + 1, num_kv_heads, row_size]:
        # moves between tiers index it once for all layers; the model reads the per-layer views.
        self.buffer = buffers
        self.k_buffers, self.v_buffers = list(buffers[0].unbind()), list(buffers[1].unbind())

    def release_memory(self) -> None:
        """CPU: give the pool's pages back to the system; they read as zeros again. Only while no slot
        holds KV that anyone will read (after a cache flush, with nothing running)."""
        if self._host is not None:
            release_pages(self._host)

    @staticmethod
    def bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * KVPool.row_size(head_dim, dtype) * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def row_size(head_dim: int, dtype: torch.dtype) -> int:
        """Elements of one (token, KV head) row: the head's values; for int8, its codes followed by
        the row's float32 scale (4 more bytes; the CPU kernels' format, see csrc/kernels.h)."""
        return head_dim + 4 if dtype == torch.int8 else head_dim

    def layer_buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V buffers, for kernels that write new tokens' KV themselves."""
        return self.k_buffers[layer_id], self.v_buffers[layer_id]

    def set_kv(self, layer_id: int, out_cache_loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.dtype == torch.int8:
            raise NotImplementedError("an int8 KV pool is written by the CPU kernels only (fused with rotary)")
        # k, v: [num_tokens, num_kv_heads, head_dim]; out_cache_loc: [num_tokens]
        k_buf, v_buf, k, v = self.k_buffers[layer_id], self.v_buffers[layer_id], k.to(self.dtype), v.to(self.dtype)
        if self.dtype.itemsize == 1:  # 8-bit floats: index_copy_ has no kernels for them, their bytes it has
            k_buf, v_buf, k, v = (t.view(torch.uint8) for t in (k_buf, v_buf, k, v))
        k_buf.index_copy_(0, out_cache_loc, k)
        v_buf.index_copy_(0, out_cache_loc, v)
