"""Prefix caches (radix, flat, none) against a naive dict of cached prefixes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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


# --- property-based: every cache against a dict of cached prefixes ----------------------------

tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=8)
prompt_st = st.lists(st.integers(0, 2), min_size=2, max_size=8)


class Oracle:
    """What each cache should hold, as `matchable sequence -> its slots`.

    radix: every prefix of every inserted sequence; flat: the inserted sequences themselves, each
    reusing the slots of the longest entry it extends; none: nothing. `own[seq]` is how many slots
    `seq` added on top of `parent[seq]`, so sizes can be summed over the parent chains.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self.slots: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.own: dict[tuple[int, ...], int] = {}
        self.parent: dict[tuple[int, ...], tuple[int, ...]] = {}

    def longest(self, seq: tuple[int, ...]) -> tuple[int, ...]:
        return next((seq[:i] for i in range(len(seq), 0, -1) if seq[:i] in self.slots), ())

    def insert(self, seq: tuple[int, ...], slots: tuple[int, ...]) -> int:
        if self.kind == "none":
            return 0
        base = self.longest(seq)
        prefix_len, base_slots = len(base), self.slots.get(base, ())
        if self.kind == "radix":
            for i in range(prefix_len + 1, len(seq) + 1):
                self.slots[seq[:i]] = base_slots + slots[prefix_len:i]
                self.own[seq[:i]], self.parent[seq[:i]] = 1, seq[: i - 1]
        elif prefix_len < len(seq):
            self.slots[seq] = base_slots + slots[prefix_len:]
            self.own[seq], self.parent[seq] = len(seq) - prefix_len, base
        return prefix_len

    def remove(self, seqs: set[tuple[int, ...]]) -> None:
        for seq in seqs:
            del self.slots[seq], self.own[seq], self.parent[seq]

    def size(self, seqs: set[tuple[int, ...]]) -> int:
        return sum(self.own[s] for s in seqs)

    def chains(self, seqs: list[tuple[int, ...]]) -> set[tuple[int, ...]]:
        out = set()
        for seq in seqs:
            while seq:
                out.add(seq)
                seq = self.parent[seq]
        return out


def cached_sequences(cache: PrefixCache, kind: str) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Read the cache's content off its tree, in the oracle's form."""
    out = {}
    stack = [(child, (), ()) for child in cache.root.children.values()]
    while stack:
        node, path, path_slots = stack.pop()
        key, slots = tuple(node.key), tuple(node.value.tolist())
        if kind == "radix":
            for i in range(1, len(key) + 1):
                out[path + key[:i]] = path_slots + slots[:i]
        else:
            out[path + key] = path_slots + slots
        stack.extend((child, path + key, path_slots + slots) for child in node.children.values())
    return out


class PrefixCacheMachine(RuleBasedStateMachine):
    kind = "radix"

    def __init__(self):
        super().__init__()
        self.allocator = SlotAllocator(24)
        self.cache = create_prefix_cache(self.kind, self.allocator)
        self.oracle = Oracle(self.kind)
        self.locks: list[tuple[TreeNode, tuple[int, ...]]] = []
        self.reqs: list[Req] = []

    # helpers

    def evict(self, num_tokens: int) -> int:
        evictable = self.cache.evictable_size
        before = set(self.oracle.slots)
        freed = self.cache.evict(num_tokens)
        assert min(num_tokens, evictable) <= freed <= evictable
        after = set(cached_sequences(self.cache, self.kind))
        assert after <= before
        removed = before - after
        assert not removed & self.oracle.chains(self.locked_sequences()), "a locked prefix was evicted"
        assert self.oracle.size(removed) == freed
        self.oracle.remove(removed)
        return freed

    def alloc(self, n: int) -> torch.Tensor | None:
        if self.allocator.num_free_slots < n:
            self.evict(n - self.allocator.num_free_slots)
        return self.allocator.alloc(n)

    def locked_sequences(self) -> list[tuple[int, ...]]:
        return [seq for _, seq in self.locks] + [tuple(r.tokens[: r.cache_protected_len]) for r in self.reqs]

    def check_match(self, seq: tuple[int, ...]):
        match = self.cache.match_prefix(list(seq))
        expected = self.oracle.longest(seq)
        assert tuple(match.slot_ids.tolist()) == self.oracle.slots.get(expected, ())
        return match, expected

    # rules

    @rule(seq=tokens_st)
    def insert(self, seq):
        slots = self.alloc(len(seq))
        if slots is None:
            return
        result = self.cache.insert(seq, slots)
        assert result.already_cached_len == self.oracle.insert(tuple(seq), tuple(slots.tolist()))
        assert result.cached_len == (0 if self.kind == "none" else len(seq))
        self.allocator.free(torch.cat([slots[: result.already_cached_len], slots[result.cached_len :]]))

    @rule(seq=tokens_st)
    def match(self, seq):
        self.check_match(tuple(seq))

    @rule(seq=tokens_st)
    def lock(self, seq):
        match, expected = self.check_match(tuple(seq))
        self.cache.lock(match.last_node)
        self.locks.append((match.last_node, expected))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 100))
    def unlock(self, i):
        node, _ = self.locks.pop(i % len(self.locks))
        self.cache.unlock(node)

    @rule(num_tokens=st.integers(0, 20))
    def evict_tokens(self, num_tokens):
        self.evict(num_tokens)

    @precondition(lambda self: not self.locks and not self.reqs)
    @rule()
    def reset(self):
        self.cache.reset()
        self.oracle = Oracle(self.kind)
        assert self.allocator.num_free_slots == self.allocator.num_slots

    @rule(prompt=prompt_st)
    def start_request(self, prompt):
        match, expected = self.check_match(tuple(prompt[:-1]))
        self.cache.lock(match.last_node)
        new_slots = self.alloc(len(prompt) - len(expected))
        if new_slots is None:
            self.cache.unlock(match.last_node)
            return
        self.reqs.append(Req(list(prompt), torch.cat([match.slot_ids, new_slots]), len(expected), match.last_node))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def request_inserts_unfinished(self, i):
        req = self.reqs[i % len(self.reqs)]
        old_slots = req.slots.clone()
        after_prefill(self.cache, self.allocator, req)
        self.oracle.insert(tuple(req.tokens), tuple(old_slots.tolist()))
        cached_len = 0 if self.kind == "none" else len(req.tokens)
        assert req.cache_protected_len == cached_len
        assert tuple(req.slots[:cached_len].tolist()) == self.oracle.slots.get(tuple(req.tokens), ())
        assert req.slots[cached_len:].tolist() == old_slots[cached_len:].tolist()

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), token=st.integers(0, 2))
    def request_decodes(self, i, token):
        req = self.reqs[i % len(self.reqs)]
        slot = self.alloc(1)
        if slot is not None:
            req.tokens.append(token)
            req.slots = torch.cat([req.slots, slot])

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def request_finishes(self, i):
        req = self.reqs.pop(i % len(self.reqs))
        finish(self.cache, self.allocator, req)
        self.oracle.insert(tuple(req.tokens), tuple(req.slots.tolist()))

    @invariant()
    def consistent_with_oracle(self):
        self.cache.assert_integrity(privately_owned=sum(r.num_private for r in self.reqs))
        assert cached_sequences(self.cache, self.kind) == self.oracle.slots
        assert self.cache.total_size == self.oracle.size(set(self.oracle.slots))
        assert self.cache.protected_size == self.oracle.size(self.oracle.chains(self.locked_sequences()))


_machine_settings = settings(max_examples=70, stateful_step_count=40, deadline=None, database=None)


@_machine_settings
class RadixMachine(PrefixCacheMachine):
    kind = "radix"


@_machine_settings
class FlatMachine(PrefixCacheMachine):
    kind = "flat"


@settings(_machine_settings, max_examples=20)
class NoneMachine(PrefixCacheMachine):
    kind = "none"


TestRadixCacheMachine = RadixMachine.TestCase
TestFlatCacheMachine = FlatMachine.TestCase
TestNoCacheMachine = NoneMachine.TestCase
