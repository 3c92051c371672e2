"""RadixAttention's cache: a radix tree over token ids whose edges carry KV slot ids (page size 1).

`LRUTreeCache` holds what every tree-shaped cache shares: size counters, lock/unlock along the
path to the root, and LRU eviction of unlocked leaves through a lazily validated heap. `RadixCache`
adds the radix walk: children keyed by first token, edges split where a match or insert diverges
inside them, so any shared prefix is shared, however it was inserted.
"""

from __future__ import annotations

import heapq
import itertools
from abc import abstractmethod
from collections.abc import Hashable, Iterator, Sequence

import torch

from plait.runtime.cache.base import InsertResult, MatchResult, PrefixCache, TreeNode, empty_slots
from plait.runtime.memory.kv_pool import SlotAllocator

_COMPARE_CHUNK = 64


def common_prefix_len(key: list[int], tokens: list[int], start: int) -> int:
    """Length of the common prefix of `key` and `tokens[start:]`.

    Compares 64-token slices (a C-level list compare) and only loops in Python inside the first
    slice that differs, so long shared prompts cost little interpreter time.
    """
    limit = min(len(key), len(tokens) - start)
    i = 0
    while i < limit:
        j = min(i + _COMPARE_CHUNK, limit)
        if key[i:j] != tokens[start + i : start + j]:
            while key[i] == tokens[start + i]:
                i += 1
            return i
        i = j
    return limit


def stored_copy(slot_ids: torch.Tensor) -> torch.Tensor:
    # The caller's tensor is usually a view of a req_to_token row that is about to be reused.
    return slot_ids.to(device="cpu", dtype=torch.int64, copy=True)


class LRUTreeCache(PrefixCache):
    """Size accounting, locking and LRU leaf eviction for caches built of `TreeNode`s.

    Eviction uses a heap of `(last_access_time, push_seq, node)` that is kept lazily: an entry is
    pushed whenever an unlocked node becomes a leaf or a leaf's access time changes, and stale
    entries (node gone, no longer a leaf, locked, or touched since) are dropped when popped. The
    heap is rebuilt from the tree when stale entries outnumber the nodes. Access "time" is a
    counter bumped once per match or insert, which keeps LRU order deterministic.
    """

    def __init__(self, allocator: SlotAllocator):
        super().__init__(allocator)
        self._clock = 0
        self._push_seq = itertools.count()
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = self._make_node([], empty_slots(), None)
        self._evictable_size = 0
        self._protected_size = 0
        self._num_nodes = 0  # excluding the root
        self._heap: list[tuple[int, int, TreeNode]] = []

    # --- hooks for the concrete tree ---------------------------------------------------------

    @abstractmethod
    def _child_key(self, node: TreeNode) -> Hashable:
        """The key under which `node` sits in `node.parent.children`."""

    def _make_node(self, key: list[int], value: torch.Tensor, parent: TreeNode | None) -> TreeNode:
        return TreeNode(key, value, parent, self._clock)

    def _on_remove(self, node: TreeNode) -> None:
        """Called when eviction takes `node` out of the tree."""

    # --- counters ----------------------------------------------------------------------------

    @property
    def evictable_size(self) -> int:
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        return self._protected_size

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _new_leaf(self, parent: TreeNode, key: list[int], value: torch.Tensor) -> TreeNode:
        assert key and len(key) == value.numel()
        leaf = self._make_node(key, value, parent)
        parent.children[self._child_key(leaf)] = leaf
        self._num_nodes += 1
        self._evictable_size += len(key)
        self.stats.inserted_tokens += len(key)
        self._push(leaf)
        return leaf

    # --- lock / unlock -----------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        assert node.in_tree, "locking an evicted node"
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        assert node.in_tree, "unlocking an evicted node"
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without a matching lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_size -= len(node.key)
                self._evictable_size += len(node.key)
                if not node.children:
                    self._push(node)
            node = node.parent

    # --- eviction ----------------------------------------------------------------------------

    def _push(self, node: TreeNode) -> None:
        """Offer an unlocked leaf to the eviction heap (call again whenever its access time changes)."""
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()
        heapq.heappush(self._heap, (node.last_access_time, next(self._push_seq), node))

    def _rebuild_heap(self) -> None:
        self._heap = [
            (n.last_access_time, next(self._push_seq), n) for n in self._nodes() if not n.children and n.lock_ref == 0
        ]
        heapq.heapify(self._heap)

    @staticmethod
    def _is_live_entry(entry: tuple[int, int, TreeNode]) -> bool:
        time, _, node = entry
        return node.in_tree and not node.children and node.lock_ref == 0 and node.last_access_time == time

    def evict(self, num_tokens: int) -> int:
        freed: list[torch.Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and self._heap:
            entry = heapq.heappop(self._heap)
            if not self._is_live_entry(entry):
                continue
            node = entry[2]
            parent = node.parent
            del parent.children[self._child_key(node)]
            node.in_tree = False
            self._on_remove(node)
            self._num_nodes -= 1
            self._evictable_size -= len(node.key)
            num_freed += len(node.key)
            freed.append(node.value)
            # Parents become evictable once their last child has gone.
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._push(parent)
        if freed:
            self.allocator.free(torch.cat(freed))
        self.stats.evicted_tokens += num_freed
        return num_freed

    def reset(self) -> None:
        assert self._protected_size == 0, "reset (flush_cache) while requests hold cache locks"
        values = [n.value for n in self._nodes()]
        for n in self._nodes():
            n.in_tree = False
        if values:
            self.allocator.free(torch.cat(values))
        self._init_tree()

    # --- integrity ---------------------------------------------------------------------------

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node except the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def assert_integrity(self, *, privately_owned: int = 0) -> None:
        root = self.root
        assert not root.key and root.parent is None and root.lock_ref == 0 and root.value.numel() == 0
        evictable = protected = num_nodes = 0
        values: list[torch.Tensor] = []
        live_in_heap = {id(e[2]) for e in self._heap if self._is_live_entry(e)}
        for node in self._nodes():
            num_nodes += 1
            assert node.in_tree and node.key, f"{node}: removed or empty node in the tree"
            assert node.value.dtype == torch.int64 and node.value.dim() == 1
            assert len(node.key) == node.value.numel(), f"{node}: key and value lengths differ"
            assert node.parent is not None and node.parent.children.get(self._child_key(node)) is node
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()) >= 0, f"{node}: lock_ref"
            assert node.last_access_time <= self._clock
            if node.lock_ref > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
                if not node.children:
                    assert id(node) in live_in_heap, f"{node}: evictable leaf missing from the eviction heap"
            values.append(node.value)
            self._assert_node_shape(node)
        assert num_nodes == self._num_nodes, "node count drifted"
        assert evictable == self._evictable_size, f"evictable_size {self._evictable_size} != {evictable}"
        assert protected == self._protected_size, f"protected_size {self._protected_size} != {protected}"
        self._assert_slot_accounting(torch.cat(values) if values else empty_slots(), privately_owned)

    def _assert_node_shape(self, node: TreeNode) -> None:
        """Variant-specific structural checks on one node."""


class RadixCache(LRUTreeCache):
    """The radix tree. Children are keyed by their edge's first token."""

    def _child_key(self, node: TreeNode) -> int:
        return node.key[0]

    def _split(self, child: TreeNode, split_len: int) -> TreeNode:
        """Cut `child`'s edge after `split_len` tokens; return the new upper node.

        The upper node inherits the lock count (every lock through the child passes through it) and
        the access time, so neither size counter changes and the lower part keeps its LRU place.
        """
        assert 0 < split_len < len(child.key)
        parent = child.parent
        upper = TreeNode(child.key[:split_len], child.value[:split_len], parent, child.last_access_time)
        upper.lock_ref = child.lock_ref
        parent.children[child.key[0]] = upper
        child.key = child.key[split_len:]
        child.value = child.value[split_len:]
        child.parent = upper
        upper.children[child.key[0]] = child
        self._num_nodes += 1
        return upper

    def _walk(self, tokens: list[int]) -> tuple[TreeNode, int, list[torch.Tensor]]:
        """Follow `tokens` down the tree, splitting where the path ends inside an edge.

        Returns the deepest node on the path, the matched length and the matched slot runs, and
        refreshes access times of every node whose tokens were matched.
        """
        now = self._tick()
        node, pos, values = self.root, 0, []
        num_tokens = len(tokens)
        while pos < num_tokens:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            matched = common_prefix_len(child.key, tokens, pos)
            ends_inside_edge = matched < len(child.key)
            if ends_inside_edge:
                child = self._split(child, matched)
            child.last_access_time = now
            values.append(child.value)
            node, pos = child, pos + matched
            if ends_inside_edge:
                break
        if node is not self.root and not node.children and node.lock_ref == 0:
            self._push(node)  # its access time changed
        return node, pos, values

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        tokens = token_ids if isinstance(token_ids, list) else list(token_ids)
        node, prefix_len, values = self._walk(tokens)
        self.stats.record_lookup(requested_len=len(tokens), prefix_len=prefix_len)
        if not values:
            return MatchResult(empty_slots(), node)
        return MatchResult(values[0] if len(values) == 1 else torch.cat(values), node)

    def insert(self, token_ids: Sequence[int], slot_ids: torch.Tensor) -> InsertResult:
        tokens = token_ids if isinstance(token_ids, list) else list(token_ids)
        assert slot_ids.dim() == 1 and slot_ids.numel() == len(tokens)
        node, prefix_len, _ = self._walk(tokens)
        if prefix_len < len(tokens):
            self._new_leaf(node, tokens[prefix_len:], stored_copy(slot_ids[prefix_len:]))
        return InsertResult(prefix_len, len(tokens))

    def _assert_node_shape(self, node: TreeNode) -> None:
        for first_token, child in node.children.items():
            assert child.key[0] == first_token, f"{child}: filed under token {first_token}"
