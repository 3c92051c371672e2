"""The prefix-cache contract the scheduler codes against, and the request protocols built on it.

A prefix cache maps token sequences to the KV slots that already hold their keys and values
(page size 1: one slot per token). Ownership of slots is the whole game:

- a request *owns* the slots it allocated and has not handed over (its "private" slots);
- the cache owns every slot stored in it; a request may *use* cached slots only while it holds a
  lock on the node returned by `match_prefix`, because eviction frees unlocked slots at any time;
- `insert` hands the caller's slots for the not-yet-cached part over to the cache and tells the
  caller which of its slots were duplicates (those it must free itself).

Invariant (`assert_integrity`): free + evictable + protected + privately_owned == total slots.

`cache_finished` and `cache_unfinished` below are the two request protocols, composed from
insert / match / lock / unlock; they work for every cache variant,
including the disabled one, so the scheduler has one code path.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from plait.runtime.memory.kv_pool import SlotAllocator

_node_ids = itertools.count()


def empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


class TreeNode:
    """One edge of a prefix tree: a run of tokens and the KV slots that hold them.

    `lock_ref` counts the locks held on this node *or any descendant*: locking a node locks the
    path to the root, so only unlocked leaves can ever be evicted. The root has an empty key and
    is never locked, counted or evicted.
    """

    __slots__ = ("key", "value", "parent", "children", "lock_ref", "last_access_time", "id", "in_tree")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None, last_access_time: int = 0):
        self.key = key  # token ids of this edge
        self.value = value  # [len(key)] int64 slot ids
        self.parent = parent
        self.children: dict = {}  # radix: first token -> child; flat: the child's full key -> child
        self.lock_ref = 0
        self.last_access_time = last_access_time
        self.id = next(_node_ids)
        self.in_tree = True

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, key={self.key[:8]}{'...' if len(self.key) > 8 else ''}, lock_ref={self.lock_ref})"


class MatchResult(NamedTuple):
    slot_ids: torch.Tensor  # [prefix_len] int64, the cached KV slots of the matched prefix (read-only: may alias the cache)
    last_node: TreeNode  # lock this before using slot_ids


class InsertResult(NamedTuple):
    """What `insert` did with the caller's slots, as ranges over the inserted sequence.

    - `[0, already_cached_len)`: the cache already held these tokens in its own slots. The caller's
      slots there are duplicates, except the ones it got from the cache itself (its protected prefix,
      `[0, cache_protected_len)`), so the caller frees `[cache_protected_len, already_cached_len)`.
    - `[already_cached_len, cached_len)`: the caller's slots now belong to the cache.
    - `[cached_len, len)`: not taken; still the caller's (the disabled cache takes nothing).
    """

    already_cached_len: int
    cached_len: int


class UnfinishedResult(NamedTuple):
    slot_ids: torch.Tensor  # [seq_len] the request's slots, canonical cached ones first: write into req_to_token
    last_node: TreeNode  # now locked on the request's behalf
    cache_protected_len: int  # slot_ids[:cache_protected_len] belong to the cache


@dataclass
class CacheStats:
    """Counters for cache reporting.

    `lookup_*` count every `match_prefix` call, including cache-aware policies re-matching waiting
    requests and the re-match inside `cache_unfinished`; the admission hit rate the server reports
    comes from `record_prefill`, which the scheduler calls once per admitted prefill.
    """

    lookups: int = 0
    lookup_tokens: int = 0  # tokens asked for
    lookup_hit_tokens: int = 0  # tokens matched
    prefill_input_tokens: int = 0
    prefill_cached_tokens: int = 0
    inserted_tokens: int = 0  # tokens newly stored by insert
    evicted_tokens: int = 0

    def record_lookup(self, *, requested_len: int, prefix_len: int) -> None:
        self.lookups += 1
        self.lookup_tokens += requested_len
        self.lookup_hit_tokens += prefix_len

    def record_prefill(self, *, input_len: int, prefix_len: int) -> None:
        assert 0 <= prefix_len <= input_len
        self.prefill_input_tokens += input_len
        self.prefill_cached_tokens += prefix_len

    @property
    def hit_rate(self) -> float:
        """Fraction of admitted prompt tokens whose KV came from the cache."""
        return self.prefill_cached_tokens / self.prefill_input_tokens if self.prefill_input_tokens else 0.0


class PrefixCache(ABC):
    """A cache of KV slots keyed by token-id prefixes. Single-threaded: the scheduler owns it."""

    root: TreeNode  # the tree's root; cache-aware policies (dfs-weight) walk `children` from here

    def __init__(self, allocator: SlotAllocator):
        self.allocator = allocator
        self.stats = CacheStats()

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        """Return the longest cached prefix of `token_ids` and the node where it ends.

        Refreshes access times along the match and may split an edge so the match ends exactly at a
        node. Lock `last_node` before using `slot_ids`: until then any eviction may free them. The
        caller bounds the length: pass `token_ids[:len - 1]` so at least one token is computed (and
        stop at `logprob_start_len` when input logprobs are wanted).
        """

    @abstractmethod
    def insert(self, token_ids: Sequence[int], slot_ids: torch.Tensor) -> InsertResult:
        """Store `token_ids` with their KV `slot_ids` ([len(token_ids)] int64); see `InsertResult`.

        The caller's slots in `[already_cached_len, cached_len)` pass to the cache (new nodes are
        unlocked, hence evictable at once). The caller frees its duplicates in
        `[cache_protected_len, already_cached_len)` itself; `cache_finished` does all of this.
        """

    @abstractmethod
    def lock(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction (a reference count, so locks nest)."""

    @abstractmethod
    def unlock(self, node: TreeNode) -> None:
        """Undo one `lock(node)`; nodes whose count reaches zero become evictable again."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` unlocked cached tokens to the allocator, least recently used
        leaves first, or all evictable ones if fewer exist. May free more (whole leaves go).
        Returns the number of slots freed."""

    @property
    @abstractmethod
    def evictable_size(self) -> int:
        """Cached tokens in unlocked nodes: reclaimable on demand, so they count as available."""

    @property
    @abstractmethod
    def protected_size(self) -> int:
        """Cached tokens in locked nodes."""

    @property
    def total_size(self) -> int:
        """All cached tokens (page size 1: also all slots the cache owns)."""
        return self.evictable_size + self.protected_size

    @abstractmethod
    def reset(self) -> None:
        """Flush: free every cached slot. Only valid when idle (no locks held)."""

    @abstractmethod
    def assert_integrity(self, *, privately_owned: int = 0) -> None:
        """Check the slot-accounting invariant and the structure; raise AssertionError if broken.

        `privately_owned` is the number of slots held by running requests outside the cache.
        """

    def _assert_slot_accounting(self, cached_slots: torch.Tensor, privately_owned: int) -> None:
        """Shared part of the integrity check: counters add up and no slot is held twice."""
        free = self.allocator.free_slots()
        num_free = int(free.numel())
        assert num_free + self.evictable_size + self.protected_size + privately_owned == self.allocator.num_slots, (
            f"slot leak: free {num_free} + evictable {self.evictable_size} + protected {self.protected_size}"
            f" + private {privately_owned} != {self.allocator.num_slots}"
        )
        assert cached_slots.numel() == self.total_size
        both = torch.cat([free, cached_slots.to(free.device)])
        assert torch.unique(both).numel() == both.numel(), "a slot is cached twice, or cached and free"
        if both.numel():
            assert int(both.min()) >= 1 and int(both.max()) <= self.allocator.num_slots, "slot id out of range"


class NoPrefixCache(PrefixCache):
    """The disabled cache (`--disable-radix-cache`, the paper's "no cache" ablation).

    Matches nothing and stores nothing: `insert` returns `InsertResult(0, 0)`, so every slot stays
    the request's and `cache_finished` frees it all. The scheduler's code path is unchanged.
    """

    def __init__(self, allocator: SlotAllocator):
        super().__init__(allocator)
        self.root = TreeNode([], empty_slots(), None)

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        self.stats.record_lookup(requested_len=len(token_ids), prefix_len=0)
        return MatchResult(empty_slots(), self.root)

    def insert(self, token_ids: Sequence[int], slot_ids: torch.Tensor) -> InsertResult:
        assert slot_ids.numel() == len(token_ids)
        return InsertResult(0, 0)

    def lock(self, node: TreeNode) -> None:
        assert node is self.root

    def unlock(self, node: TreeNode) -> None:
        assert node is self.root

    def evict(self, num_tokens: int) -> int:
        return 0

    @property
    def evictable_size(self) -> int:
        return 0

    @property
    def protected_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass

    def assert_integrity(self, *, privately_owned: int = 0) -> None:
        assert not self.root.children
        self._assert_slot_accounting(empty_slots(), privately_owned)


def _free(allocator: SlotAllocator, *parts: torch.Tensor) -> None:
    parts = tuple(p for p in parts if p.numel())
    if parts:
        allocator.free(torch.cat(parts) if len(parts) > 1 else parts[0])


def cache_finished(
    cache: PrefixCache,
    allocator: SlotAllocator,
    token_ids: Sequence[int],
    slot_ids: torch.Tensor,
    cache_protected_len: int,
    last_node: TreeNode,
) -> None:
    """Hand a finished request's KV to the cache and release everything it held (runtime-design 1.7).

    `token_ids` are the committed tokens, `(prompt + output)[:len - 1]` (the last sampled token's KV
    was never written); `slot_ids` [len(token_ids)] is its req_to_token row over them;
    `slot_ids[:cache_protected_len]` are the cache's (from its match or last `cache_unfinished`) and
    `last_node` is the node it locked. Afterwards the request owns no slots and no lock; the caller
    frees its req_to_token row. Insert first, unlock after: unlocking first would let an eviction
    take the very prefix being inserted under.
    """
    assert slot_ids.numel() == len(token_ids) and 0 <= cache_protected_len <= len(token_ids)
    result = cache.insert(token_ids, slot_ids)
    assert result.already_cached_len >= cache_protected_len, "the request's locked prefix left the cache"
    _free(allocator, slot_ids[cache_protected_len : result.already_cached_len], slot_ids[result.cached_len :])
    cache.unlock(last_node)


def cache_unfinished(
    cache: PrefixCache,
    allocator: SlotAllocator,
    token_ids: Sequence[int],
    slot_ids: torch.Tensor,
    cache_protected_len: int,
    last_node: TreeNode,
) -> UnfinishedResult:
    """Make a still-running request's computed prefix shareable now (runtime-design 1.8).

    Called after a prefill (or a chunk of one) for a request that keeps going. Arguments as for
    `cache_finished`, with `token_ids` the tokens whose KV is written so far. Inserts them, frees the
    request's duplicates, re-matches to switch the request onto the cache's canonical slots, and
    moves the lock from `last_node` to the new node. The caller writes the returned `slot_ids` into
    its req_to_token row and keeps the returned `last_node` and `cache_protected_len`.
    """
    assert slot_ids.numel() == len(token_ids) and 0 <= cache_protected_len <= len(token_ids)
    result = cache.insert(token_ids, slot_ids)
    assert result.already_cached_len >= cache_protected_len, "the request's locked prefix left the cache"
    _free(allocator, slot_ids[cache_protected_len : result.already_cached_len])
    match = cache.match_prefix(token_ids)
    assert match.slot_ids.numel() == result.cached_len
    new_slot_ids = torch.cat([match.slot_ids, slot_ids[result.cached_len :]])
    # Lock the new node first so the shared path's tokens stay protected rather than bouncing
    # through evictable (no eviction can run in between either way: the scheduler is one thread).
    cache.lock(match.last_node)
    cache.unlock(last_node)
    return UnfinishedResult(new_slot_ids, match.last_node, result.cached_len)
