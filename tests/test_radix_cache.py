"""Prefix caches (radix, flat, none): unit tests of matching, insertion, locking and eviction, and the
request protocols (admit, prefill in chunks, decode, finish) the scheduler runs them through."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from plait.runtime.cache import (
    PREFIX_CACHES,
    FlatCache,
    NoPrefixCache,
    PrefixCache,
    RadixCache,
    TreeNode,
    cache_finished,
    cache_unfinished,
    create_prefix_cache,
)
from plait.runtime.cache.radix_cache import common_prefix_len
from plait.runtime.memory.kv_pool import SlotAllocator


def make(name: str, num_slots: int = 64) -> tuple[PrefixCache, SlotAllocator]:
    allocator = SlotAllocator(num_slots)
    return create_prefix_cache(name, allocator), allocator


def insert_fresh(cache: PrefixCache, allocator: SlotAllocator, tokens: list[int]) -> tuple[int, torch.Tensor]:
    """Insert with newly allocated slots, freeing duplicates as the contract says."""
    slots = allocator.alloc(len(tokens))
    assert slots is not None
    result = cache.insert(tokens, slots)
    parts = [slots[: result.already_cached_len], slots[result.cached_len :]]
    allocator.free(torch.cat(parts))
    return result.already_cached_len, slots


def alloc_or_evict(cache: PrefixCache, allocator: SlotAllocator, n: int) -> torch.Tensor | None:
    if allocator.num_free_slots < n:
        cache.evict(n - allocator.num_free_slots)
    return allocator.alloc(n)


# --- unit tests --------------------------------------------------------------------------------


def test_registry():
    assert set(PREFIX_CACHES) == {"radix", "flat", "none"}
    assert isinstance(make("radix")[0], RadixCache)
    assert isinstance(make("flat")[0], FlatCache)
    assert isinstance(make("none")[0], NoPrefixCache)
    with pytest.raises(ValueError, match="unknown prefix cache"):
        make("lru-hash")


@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 200])
def test_common_prefix_len(start: int, length: int):
    key = list(range(300))
    tokens = [-1] * start + list(range(length)) + [-5]
    assert common_prefix_len(key, tokens, start) == length
    assert common_prefix_len(key[:length], tokens, start) == length


def test_split_on_partial_edge_match():
    cache, allocator = make("radix")
    _, slots = insert_fresh(cache, allocator, [1, 2, 3, 4])
    match = cache.match_prefix([1, 2, 9])
    assert match.slot_ids.tolist() == slots[:2].tolist()
    # The match ends exactly at a node: the edge [1,2,3,4] became [1,2] -> [3,4].
    assert match.last_node.key == [1, 2] and match.last_node.parent is cache.root
    (lower,) = match.last_node.children.values()
    assert lower.key == [3, 4] and lower.value.tolist() == slots[2:].tolist()
    # A query that ends inside an edge splits too.
    match = cache.match_prefix([1, 2, 3])
    assert match.last_node.key == [3] and match.slot_ids.tolist() == slots[:3].tolist()
    assert cache.total_size == 4
    cache.assert_integrity()


def test_insert_returns_already_cached_len():
    cache, allocator = make("radix")
    assert insert_fresh(cache, allocator, [1, 2, 3])[0] == 0
    assert insert_fresh(cache, allocator, [1, 2, 3])[0] == 3
    assert insert_fresh(cache, allocator, [1, 2, 3, 4, 5])[0] == 3
    # Diverging inside an edge splits it and shares the common part.
    already, slots = insert_fresh(cache, allocator, [1, 2, 7])
    assert already == 2
    assert cache.total_size == 6
    assert cache.match_prefix([1, 2, 7]).slot_ids[2:].tolist() == slots[2:].tolist()
    assert cache.stats.inserted_tokens == 6
    cache.assert_integrity()


def test_inserted_slots_are_copied():
    cache, allocator = make("radix")
    row = allocator.alloc(3)
    expected = row.tolist()
    cache.insert([1, 2, 3], row)
    row.fill_(0)  # the caller reuses its req_to_token row
    assert cache.match_prefix([1, 2, 3]).slot_ids.tolist() == expected


@pytest.mark.parametrize("name", ["radix", "flat"])
def test_lock_protects_from_eviction(name: str):
    cache, allocator = make(name)
    insert_fresh(cache, allocator, [1, 2, 3])
    insert_fresh(cache, allocator, [5, 6])
    match = cache.match_prefix([1, 2, 3])
    cache.lock(match.last_node)
    cache.lock(match.last_node)  # locks nest
    assert (cache.evictable_size, cache.protected_size) == (2, 3)
    cache.assert_integrity()
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3]).slot_ids.tolist() == match.slot_ids.tolist()
    cache.unlock(match.last_node)
    assert cache.evict(100) == 0
    cache.unlock(match.last_node)
    assert (cache.evictable_size, cache.protected_size) == (3, 0)
    assert cache.evict(100) == 3
    assert allocator.num_free_slots == allocator.num_slots
    cache.assert_integrity()


@pytest.mark.parametrize("name", ["radix", "flat"])
def test_lru_order_of_eviction(name: str):
    cache, allocator = make(name)
    for first in (1, 2, 3, 4):
        insert_fresh(cache, allocator, [first, 0])
    cache.match_prefix([1, 0, 9])  # [1, 0] is now the most recently used
    cache.match_prefix([3, 0])  # then [3, 0]
    evicted_order: list[int] = []
    for _ in range(4):
        assert cache.evict(1) == 2
        evicted_order += [f for f in (1, 2, 3, 4) if f not in evicted_order and not _peek(cache, [f, 0])]
    assert evicted_order == [2, 4, 1, 3]
    cache.assert_integrity()


def _peek(cache: PrefixCache, tokens: list[int]) -> list[int]:
    """Cached prefix of `tokens`, read off the tree without touching access times."""
    node, pos, out = cache.root, 0, []
    while pos < len(tokens):
        child = next((c for c in node.children.values() if c.key == tokens[pos : pos + len(c.key)]), None)
        if child is None:
            break
        out += child.value.tolist()
        node, pos = child, pos + len(child.key)
    return out


def test_parents_evicted_after_children():
    cache, allocator = make("radix")
    insert_fresh(cache, allocator, [1, 2, 3])
    insert_fresh(cache, allocator, [1, 2, 4])
    parent = cache.match_prefix([1, 2]).last_node
    assert parent.key == [1, 2] and len(parent.children) == 2
    assert cache.evict(1) == 1
    assert parent.in_tree and len(parent.children) == 1
    assert cache.evict(1) == 1
    assert parent.in_tree and not parent.children
    cache.assert_integrity()
    assert cache.evict(1) == 2  # whole leaves go: over-eviction is allowed
    assert not parent.in_tree and cache.total_size == 0
    cache.assert_integrity()


def test_flat_parents_evicted_after_children():
    cache, allocator = make("flat")
    insert_fresh(cache, allocator, [1, 2])
    assert insert_fresh(cache, allocator, [1, 2, 3, 4])[0] == 2
    cache.match_prefix([1, 2])  # the parent is newer, still it must outlive its child
    assert cache.evict(1) == 2
    assert len(_peek(cache, [1, 2, 3, 4])) == 2
    assert cache.evict(1) == 2
    cache.assert_integrity()


@pytest.mark.parametrize("name", ["radix", "flat"])
def test_evict_more_than_evictable(name: str):
    cache, allocator = make(name)
    insert_fresh(cache, allocator, [1, 2, 3])
    insert_fresh(cache, allocator, [4, 5])
    insert_fresh(cache, allocator, [6])
    locked = cache.match_prefix([4, 5]).last_node
    cache.lock(locked)
    assert cache.evict(1000) == 4
    assert cache.evictable_size == 0 and cache.protected_size == 2
    assert cache.stats.evicted_tokens == 4
    assert cache.evict(0) == 0
    cache.unlock(locked)
    cache.assert_integrity()


def test_stats():
    cache, allocator = make("radix")
    insert_fresh(cache, allocator, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.match_prefix([9, 9])
    assert (cache.stats.lookups, cache.stats.lookup_tokens, cache.stats.lookup_hit_tokens) == (2, 8, 4)
    assert cache.stats.hit_rate == 0.0
    cache.stats.record_prefill(input_len=10, prefix_len=4)
    cache.stats.record_prefill(input_len=10, prefix_len=1)
    assert cache.stats.hit_rate == pytest.approx(0.25)
    cache.evict(100)
    assert (cache.stats.inserted_tokens, cache.stats.evicted_tokens) == (4, 4)


def test_flat_reuses_only_whole_entries():
    flat, allocator = make("flat")
    radix, radix_allocator = make("radix")
    for cache, alloc in ((flat, allocator), (radix, radix_allocator)):
        insert_fresh(cache, alloc, [1, 2, 3, 4])
    assert len(radix.match_prefix([1, 2, 3, 9]).slot_ids) == 3
    assert len(flat.match_prefix([1, 2, 3, 9]).slot_ids) == 0
    # A sequence diverging inside an entry shares nothing with it...
    assert insert_fresh(flat, allocator, [1, 2, 3, 9])[0] == 0
    assert flat.total_size == 8
    # ...one that extends an entry reuses its slots and stores only the tail.
    head = flat.match_prefix([1, 2, 3, 4]).slot_ids
    already, slots = insert_fresh(flat, allocator, [1, 2, 3, 4, 5, 6])
    assert already == 4 and flat.total_size == 10
    assert flat.match_prefix([1, 2, 3, 4, 5, 6, 7]).slot_ids.tolist() == head.tolist() + slots[4:].tolist()
    assert len(flat.match_prefix([1, 2, 3, 4, 5]).slot_ids) == 4
    flat.assert_integrity()


def test_none_cache_stores_nothing():
    cache, allocator = make("none")
    slots = allocator.alloc(3)
    assert tuple(cache.insert([1, 2, 3], slots)) == (0, 0)
    match = cache.match_prefix([1, 2, 3])
    assert match.slot_ids.numel() == 0 and match.last_node is cache.root
    cache.lock(match.last_node)
    assert cache.evict(10) == 0 and cache.total_size == 0
    cache.assert_integrity(privately_owned=3)  # the slots are still the caller's
    cache.unlock(match.last_node)
    allocator.free(slots)
    cache.assert_integrity()


@pytest.mark.parametrize("name", ["radix", "flat"])
def test_reset(name: str):
    cache, allocator = make(name)
    insert_fresh(cache, allocator, [1, 2, 3])
    node = cache.match_prefix([1, 2, 3]).last_node
    cache.lock(node)
    with pytest.raises(AssertionError, match="locks"):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert cache.total_size == 0 and allocator.num_free_slots == allocator.num_slots
    assert cache.match_prefix([1, 2, 3]).slot_ids.numel() == 0
    cache.assert_integrity()


def test_integrity_catches_leaks_and_double_ownership():
    cache, allocator = make("radix")
    insert_fresh(cache, allocator, [1, 2, 3])
    leaked = allocator.alloc(1)
    with pytest.raises(AssertionError, match="slot leak"):
        cache.assert_integrity()
    cache.assert_integrity(privately_owned=1)
    allocator.free(leaked)
    allocator.free(cache.match_prefix([1]).slot_ids)  # a cached slot freed behind the cache's back
    with pytest.raises(AssertionError):
        cache.assert_integrity()


def test_eviction_heap_stays_bounded():
    cache, allocator = make("radix")
    for first in range(5):
        insert_fresh(cache, allocator, [first, 1, 2])
    for step in range(2000):
        cache.match_prefix([step % 5, 1, 2])
    assert len(cache._heap) <= 2 * cache._num_nodes + 65
    cache.assert_integrity()
    assert cache.evict(3) == 3 and len(_peek(cache, [0, 1, 2])) == 0  # [0,1,2] was used longest ago


# --- the request protocols ---------------------------------------------------------------------


@dataclass
class Req:
    """The scheduler-side view of a request: its committed tokens and its req_to_token row."""

    tokens: list[int]
    slots: torch.Tensor  # [len(tokens)]
    cache_protected_len: int
    last_node: TreeNode

    @property
    def num_private(self) -> int:
        return len(self.tokens) - self.cache_protected_len


def admit(cache: PrefixCache, allocator: SlotAllocator, prompt: list[int]) -> Req:
    match = cache.match_prefix(prompt[:-1])
    cache.lock(match.last_node)
    new_slots = alloc_or_evict(cache, allocator, len(prompt) - match.slot_ids.numel())
    assert new_slots is not None
    return Req(list(prompt), torch.cat([match.slot_ids, new_slots]), match.slot_ids.numel(), match.last_node)


def after_prefill(cache: PrefixCache, allocator: SlotAllocator, req: Req) -> None:
    result = cache_unfinished(cache, allocator, req.tokens, req.slots, req.cache_protected_len, req.last_node)
    req.slots, req.last_node, req.cache_protected_len = result


def decode(cache: PrefixCache, allocator: SlotAllocator, req: Req, token: int) -> None:
    slot = alloc_or_evict(cache, allocator, 1)
    assert slot is not None
    req.tokens.append(token)
    req.slots = torch.cat([req.slots, slot])


def finish(cache: PrefixCache, allocator: SlotAllocator, req: Req) -> None:
    cache_finished(cache, allocator, req.tokens, req.slots, req.cache_protected_len, req.last_node)


@pytest.mark.parametrize("name", list(PREFIX_CACHES))
def test_two_requests_share_a_prefix(name: str):
    cache, allocator = make(name, num_slots=48)
    shared = list(range(100, 108))
    a = admit(cache, allocator, shared + [1, 2, 3])
    b = admit(cache, allocator, shared + [4, 5, 6])  # admitted in the same batch: no hit yet
    assert a.cache_protected_len == b.cache_protected_len == 0
    b_shared_slots = b.slots[:8].clone()
    cache.assert_integrity(privately_owned=22)

    after_prefill(cache, allocator, a)
    after_prefill(cache, allocator, b)
    if name == "none":
        assert a.cache_protected_len == b.cache_protected_len == 0
        cache.assert_integrity(privately_owned=22)
    else:
        assert a.cache_protected_len == b.cache_protected_len == 11
        if name == "radix":
            # b switched to a's slots for the shared prefix; its own copies went back to the free list.
            assert b.slots[:8].tolist() == a.slots[:8].tolist()
            assert set(b_shared_slots.tolist()) <= set(allocator.free_slots().tolist())
            assert cache.total_size == 14 and cache.protected_size == 14
        else:  # flat: the two prompts diverge inside each other, so nothing is shared
            assert cache.total_size == 22
        cache.assert_integrity()

    # A third request arriving later hits the prefix at once (flat: only a whole entry).
    c = admit(cache, allocator, shared + [1, 2, 3, 7])
    assert c.cache_protected_len == {"radix": 11, "flat": 11, "none": 0}[name]
    if name != "none":
        assert c.slots[:11].tolist() == a.slots[:11].tolist()

    decode(cache, allocator, a, 20)
    decode(cache, allocator, a, 21)
    decode(cache, allocator, b, 30)
    cache.assert_integrity(privately_owned=a.num_private + b.num_private + c.num_private)

    finish(cache, allocator, a)
    cache.assert_integrity(privately_owned=b.num_private + c.num_private)
    finish(cache, allocator, c)
    finish(cache, allocator, b)
    cache.assert_integrity()
    assert cache.protected_size == 0
    if name == "radix":
        assert cache.total_size == 8 + 5 + 4 + 1  # shared, a's tail + 2 decoded, b's + 1, c's extra token
    cache.evict(cache.evictable_size)
    assert allocator.num_free_slots == allocator.num_slots


def test_chunked_prefill_inserts_each_chunk():
    cache, allocator = make("radix")
    prompt = list(range(10))
    req = admit(cache, allocator, prompt[:4])  # first chunk
    after_prefill(cache, allocator, req)
    assert len(cache.match_prefix(prompt[:3]).slot_ids) == 3  # already shareable
    new_slots = alloc_or_evict(cache, allocator, 6)
    req.tokens, req.slots = prompt, torch.cat([req.slots, new_slots])
    after_prefill(cache, allocator, req)
    assert req.cache_protected_len == 10 and cache.protected_size == 10
    finish(cache, allocator, req)
    assert cache.protected_size == 0 and cache.total_size == 10
    cache.assert_integrity()
