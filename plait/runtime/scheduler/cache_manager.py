"""The one owner of KV memory for the scheduler: slot allocator, req_to_token rows, prefix cache.

Every slot is at any time free, in the cache (evictable or protected by a lock), or privately owned
by exactly one running request; `check_integrity` verifies that after any step.
"""

from __future__ import annotations

from typing import Iterable

import torch

from plait.runtime.cache import create_prefix_cache
from plait.runtime.cache.base import PrefixCache, cache_finished, cache_unfinished
from plait.runtime.memory.kv_pool import ReqToTokenPool, SlotAllocator
from plait.runtime.scheduler.request import Req


class CacheManager:
    def __init__(self, allocator: SlotAllocator, req_to_token_pool: ReqToTokenPool, *, prefix_cache: str = "radix"):
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.cache: PrefixCache = create_prefix_cache(prefix_cache, allocator)

    @property
    def available_tokens(self) -> int:
        """Slots that could be handed out now: free plus evictable."""
        return self.allocator.num_free_slots + self.cache.evictable_size

    def match(self, req: Req) -> int:
        """Look up the request's cached prefix (no lock yet); returns its length."""
        limit = req.match_limit()
        match = self.cache.match_prefix(req.fill_ids[:limit])
        req.prefix_len = int(match.slot_ids.numel())
        req._match = match  # type: ignore[attr-defined]  # consumed by admit()
        return req.prefix_len

    def admit(self, req: Req) -> bool:
        """Lock the matched prefix and give the request a req_to_token row; False if no row is free."""
        row = self.req_to_token_pool.alloc()
        if row is None:
            return False
        match = req._match  # type: ignore[attr-defined]
        self.cache.lock(match.last_node)
        req.req_pool_idx = row
        req.last_node = match.last_node
        req.cache_protected_len = req.prefix_len
        req.kv_committed_len = req.prefix_len
        if req.prefix_len:
            self.req_to_token_pool.write(row, 0, match.slot_ids.to(self.allocator.device))
        del req._match  # type: ignore[attr-defined]
        return True

    def commit_admission(self, req: Req) -> None:
        """The request is in the batch for good: its first admission sets the reported cache hit."""
        if not req.admitted_once:
            req.cached_tokens = req.prefix_len
            self.cache.stats.record_prefill(input_len=len(req.prompt_ids), prefix_len=min(req.prefix_len, len(req.prompt_ids)))
        req.admitted_once = True

    def unadmit(self, req: Req) -> None:
        """Undo `admit` before anything was computed (admission found too little memory after locking)."""
        self.cache.unlock(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.reset_kv()

    def alloc_slots(self, num_tokens: int) -> torch.Tensor | None:
        """New slots, evicting from the cache as needed; None if even that is not enough."""
        slots = self.allocator.alloc(num_tokens)
        if slots is None:
            self.cache.evict(num_tokens - self.allocator.num_free_slots)
            slots = self.allocator.alloc(num_tokens)
        return slots

    def row_slots(self, req: Req, length: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.req_pool_idx, :length]

    def cache_unfinished(self, req: Req) -> None:
        """Share a running request's computed prefix with everyone (after a prefill or chunk)."""
        length = req.kv_committed_len
        result = cache_unfinished(
            self.cache, self.allocator, req.fill_ids[:length], self.row_slots(req, length).cpu(),
            req.cache_protected_len, req.last_node,
        )
        self.req_to_token_pool.write(req.req_pool_idx, 0, result.slot_ids.to(self.allocator.device))
        req.last_node = result.last_node
        req.cache_protected_len = result.cache_protected_len

    def release(self, req: Req) -> None:
        """A request leaves (finished, aborted or retracted): its KV goes to the cache, its lock and row are released."""
        if req.req_pool_idx is None:
            return
        length = req.kv_committed_len
        cache_finished(
            self.cache, self.allocator, req.fill_ids[:length], self.row_slots(req, length).cpu(),
            req.cache_protected_len, req.last_node,
        )
        self.req_to_token_pool.free(req.req_pool_idx)
        req.reset_kv()

    def flush(self) -> None:
        self.cache.reset()

    def check_integrity(self, active: Iterable[Req]) -> None:
        private = sum(r.kv_committed_len - r.cache_protected_len for r in active if r.req_pool_idx is not None)
        self.cache.assert_integrity(privately_owned=private)
