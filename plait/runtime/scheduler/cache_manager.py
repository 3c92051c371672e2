"""The one owner of KV memory for the scheduler: slot allocator, req_to_token rows, prefix cache.

Every slot is at any time free, in the cache (evictable or protected by a lock), or privately owned
by exactly one running request; `check_integrity` verifies that after any step.

The req_to_token rows live on the device; the prefix cache needs their slot ids on the host (when a
request's KV is inserted). Reading a row back would wait for every step queued on the device, so
each row has a host mirror: new slots are copied to the host without blocking when they are
allocated, and read once that copy is done, which never waits for a forward pass launched after it.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

from plait.runtime.cache import create_prefix_cache
from plait.runtime.cache.base import MatchResult, PrefixCache, cache_finished, cache_unfinished
from plait.runtime.cache.hiradix_cache import HiRadixCache
from plait.runtime.cache.workflow import StepGraph
from plait.runtime.memory.kv_pool import ReqToTokenPool, SlotAllocator
from plait.runtime.scheduler.request import Req


class _SlotCopy(NamedTuple):
    """New slots on their way to the host mirror: `host[offset:offset + n]` goes to `row[start:start + n]`."""

    host: torch.Tensor
    done: torch.cuda.Event | None
    placements: list[tuple[int, int, int, int]]  # (row, start, offset, n)


# A lower-tier hit shorter than this is recomputed rather than loaded (a load costs a step's wait).
MIN_LOAD_TOKENS = 16


class CacheManager:
    def __init__(self, allocator: SlotAllocator, req_to_token_pool: ReqToTokenPool, *, prefix_cache: str = "radix",
                 cache: PrefixCache | None = None):
        """`cache`: an already built prefix cache (the tiered one), instead of one by name."""
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.cache: PrefixCache = cache if cache is not None else create_prefix_cache(prefix_cache, allocator)
        self.tiered: HiRadixCache | None = cache if isinstance(cache, HiRadixCache) else None
        self._host_rows: dict[int, list[int]] = {}  # req_pool_idx -> its slot ids so far
        self._copies: list[_SlotCopy] = []  # not yet in `_host_rows`

    @property
    def available_tokens(self) -> int:
        """Slots that could be handed out now: free plus evictable."""
        return self.allocator.num_free_slots + self.cache.evictable_size

    def match(self, req: Req, *, load_budget: int | None = None) -> int:
        """Look up the request's cached prefix (no lock yet); returns its length. With tiers and a
        `load_budget` (the admission round, for a request it reaches: the slots it may still give
        away), a prefix found below the device that fits it starts loading back, and the request
        waits for it (`waiting_for_load`) instead of recomputing it."""
        limit = req.match_limit()
        if self.tiered is None:
            match = self.cache.match_prefix(req.fill_ids[:limit])
        else:
            match = self._match_tiers(req, req.fill_ids[:limit], load_budget=load_budget)
        req.prefix_len = int(match.slot_ids.numel())
        req.pending_match = match  # consumed by admit()
        return req.prefix_len

    def _match_tiers(self, req: Req, tokens: list[int], *, load_budget: int | None) -> MatchResult:
        cache = self.tiered
        self._settle_load(req)
        found = cache.match_tiers(tokens)
        if found.prefetch_hit:
            cache.tier_stats.prefetch_hits += 1
        if req.pending_load is None:
            job = found.loading
            if job is not None:
                if job.is_prefetch:
                    cache.tier_stats.prefetch_late += 1
            elif (load_budget is not None and found.lower_len >= MIN_LOAD_TOKENS
                  and found.lower_len + found.device.slot_ids.numel() <= load_budget):  # it locks the device part too
                job = cache.loads.start(found.lower_nodes)
            if job is not None:
                job.waiters += 1
                req.pending_load = job
        return found.device

    def _settle_load(self, req: Req) -> None:
        job = req.pending_load
        if job is None:
            return
        if job.done.is_set() and not job.finished:
            self.tiered.loads.poll()
        if job.finished:
            self.tiered.loads.release_waiter(job)
            req.pending_load = None

    def waiting_for_load(self, req: Req) -> bool:
        """The request's prefix is still being loaded back: admit it later, with the longer match."""
        self._settle_load(req)
        return req.pending_load is not None

    @property
    def loads_pending(self) -> bool:
        return self.tiered is not None and bool(self.tiered.loads.jobs)

    def poll_loads(self, *, wait_s: float = 0.0) -> None:
        """Apply finished loads (waiting up to `wait_s` for one when nothing else can run)."""
        if self.tiered is not None:
            if wait_s > 0:
                self.tiered.loads.wait(wait_s)
            else:
                self.tiered.loads.poll()

    def on_workflow_request(self, workflow_id: str, agent: str, *, budget: int) -> None:
        """A request of `agent` arrived: its workflow moves to that agent's step, and the next
        step's agents' contexts start coming back to the device, in at most `budget` slots."""
        if self.tiered is not None:
            self.tiered.workflows.on_agent(workflow_id, agent)
            self.tiered.prefetch(workflow_id, budget=budget)

    def on_abort(self, req: Req) -> None:
        """A client aborted the request: its workflow's prefetches stop too (nothing waits for them)."""
        if self.tiered is not None and req.msg.workflow_id:
            self.tiered.loads.cancel_prefetches(req.msg.workflow_id)

    def publish_workflow(self, workflow_id: str, graph: StepGraph, current_step: str | None) -> None:
        if self.tiered is not None:
            self.tiered.workflows.publish(workflow_id, graph, current_step)

    def admit(self, req: Req) -> bool:
        """Lock the matched prefix and give the request a req_to_token row; False if no row is free."""
        row = self.req_to_token_pool.alloc()
        if row is None:
            return False
        match = req.pending_match
        assert match is not None, "match() comes before admit()"
        self.cache.lock(match.last_node)
        req.req_pool_idx = row
        req.last_node = match.last_node
        req.cache_protected_len = req.prefix_len
        req.kv_committed_len = req.prefix_len
        if req.prefix_len:
            self.req_to_token_pool.write(row, 0, match.slot_ids.to(self.allocator.device, non_blocking=True))
        self._host_rows[row] = match.slot_ids.tolist()
        req.pending_match = None
        return True

    def commit_admission(self, req: Req) -> None:
        """The request is in the batch for good: its first admission sets the reported cache hit."""
        if not req.admitted_once:
            req.cached_tokens = req.prefix_len
            if self.tiered is not None:
                self.tiered.tier_stats.device_hit_tokens += min(req.prefix_len, len(req.prompt_ids))
            self.cache.stats.record_prefill(input_len=len(req.prompt_ids), prefix_len=min(req.prefix_len, len(req.prompt_ids)))
        req.admitted_once = True

    def unadmit(self, req: Req) -> None:
        """Undo `admit` before anything was computed (admission found too little memory after locking)."""
        self.cache.unlock(req.last_node)
        self._free_row(req.req_pool_idx)
        req.reset_kv()

    def alloc_slots(self, num_tokens: int) -> torch.Tensor | None:
        """New slots, evicting from the cache as needed; None if even that is not enough."""
        slots = self.allocator.alloc(num_tokens)
        if slots is None:
            self.cache.evict(num_tokens - self.allocator.num_free_slots)
            slots = self.allocator.alloc(num_tokens)
        return slots

    def alloc_for(self, reqs: list[Req], counts: list[int]) -> torch.Tensor | None:
        """Slots for `counts[i]` new tokens of each request, which go into its row at
        `kv_committed_len` (the caller writes the device rows); None if memory is short."""
        slots = self.alloc_slots(sum(counts))
        if slots is None:
            return None
        placements, offset = [], 0
        for req, n in zip(reqs, counts):
            placements.append((req.req_pool_idx, req.kv_committed_len, offset, n))
            offset += n
        if slots.device.type == "cuda":
            host = slots.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._copies.append(_SlotCopy(host, done, placements))
        else:
            self._copies.append(_SlotCopy(slots, None, placements))
        return slots

    def row_slots(self, req: Req, length: int) -> torch.Tensor:
        """The first `length` slot ids of the request's row, on the host."""
        self._drain_copies()
        row = self._host_rows[req.req_pool_idx]
        assert len(row) >= length
        return torch.tensor(row[:length], dtype=torch.int64)

    def _drain_copies(self) -> None:
        for copy in self._copies:
            if copy.done is not None:
                copy.done.synchronize()
            values = copy.host.tolist()
            for row, start, offset, n in copy.placements:
                host_row = self._host_rows[row]
                assert len(host_row) >= start
                host_row[start : start + n] = values[offset : offset + n]
        self._copies.clear()

    def _free_row(self, row: int) -> None:
        self._drain_copies()  # none of them may land in a row handed out again
        del self._host_rows[row]
        self.req_to_token_pool.free(row)

    def cache_unfinished(self, req: Req) -> None:
        """Share a running request's computed prefix with everyone (after a prefill or chunk)."""
        length = req.kv_committed_len
        result = cache_unfinished(
            self.cache, self.allocator, req.fill_ids[:length], self.row_slots(req, length),
            req.cache_protected_len, req.last_node,
        )
        self.req_to_token_pool.write(req.req_pool_idx, 0, result.slot_ids.to(self.allocator.device, non_blocking=True))
        self._host_rows[req.req_pool_idx][:length] = result.slot_ids.tolist()
        req.last_node = result.last_node
        req.cache_protected_len = result.cache_protected_len

    def release(self, req: Req) -> None:
        """A request leaves (finished, aborted or retracted): its KV goes to the cache, its lock and row are released.
        A load it waited for stops if no one else waits for it."""
        if req.pending_load is not None:
            self.tiered.loads.release_waiter(req.pending_load)
            req.pending_load = None
        if req.req_pool_idx is None:
            return
        slots = self.row_slots(req, req.kv_committed_len)
        # Overlap scheduling: the step after the request's last token may have written KV for a token
        # that never became part of the request (it ended, or the grammar refused the token before).
        length = min(req.kv_committed_len, req.seq_len)
        cache_finished(
            self.cache, self.allocator, req.fill_ids[:length], slots[:length], req.cache_protected_len, req.last_node,
        )
        self.allocator.free(slots[length:])
        if self.tiered is not None and req.msg.workflow_id and req.msg.agent:
            self.tiered.tag(req.fill_ids[:length], req.msg.workflow_id, req.msg.agent)
        self._free_row(req.req_pool_idx)
        req.reset_kv()

    @staticmethod
    def shared_prefix_groups(reqs: list[Req], *, min_prefix: int = 64) -> list[tuple[list[int], int]]:
        """Requests (by position in `reqs`) whose rows start with the same cached slots, and how many.

        Read off the prefix tree, with no device work: a request's row starts with the path of its
        `last_node` (the prefix the cache holds for it, locked). Each request joins the group of the
        deepest node on that path that another request of the batch also passes through, if that
        node is at least `min_prefix` tokens deep; groups of one are dropped. The shared length is
        below every member's committed KV, so each keeps at least its new token for itself.
        """
        depth: dict[int, int] = {}  # node id -> tokens from the root through that node
        count: dict[int, int] = {}  # node id -> requests whose path passes through it
        paths = []
        for req in reqs:
            path = []
            node = req.last_node
            while node is not None and node.parent is not None:  # the root has no parent
                path.append(node)
                node = node.parent
            path.reverse()
            tokens = 0
            for node in path:
                tokens += len(node.key)
                depth[node.id] = tokens
                count[node.id] = count.get(node.id, 0) + 1
            paths.append(path)
        groups: dict[int, list[int]] = {}
        for i, path in enumerate(paths):
            for node in reversed(path):
                if count[node.id] >= 2 and depth[node.id] >= min_prefix:
                    groups.setdefault(node.id, []).append(i)
                    break
        return [(members, depth[node_id]) for node_id, members in groups.items() if len(members) >= 2]

    def flush(self) -> None:
        self.cache.reset()

    def check_integrity(self, active: Iterable[Req]) -> None:
        holding = [r for r in active if r.req_pool_idx is not None]
        private = sum(r.kv_committed_len - r.cache_protected_len for r in holding)
        self.cache.assert_integrity(privately_owned=private)
        assert sorted(self._host_rows) == sorted(r.req_pool_idx for r in holding), "a row without its request"
        for req in holding:  # the host mirror agrees with the device rows
            mirror = self.row_slots(req, req.kv_committed_len)
            assert torch.equal(mirror, self.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_committed_len].cpu())
