"""Property tests of the prefix caches (radix, flat, none): a state machine of inserts, matches,
locks, evictions and whole requests, every cache against a dict of the prefixes it should hold."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from plait.runtime.cache import (
    PrefixCache,
    TreeNode,
    create_prefix_cache,
)
from plait.runtime.memory.kv_pool import SlotAllocator
from tests.test_radix_cache import Req, after_prefill, finish


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
