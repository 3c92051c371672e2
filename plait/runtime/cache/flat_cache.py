"""The "no tree" ablation: a table of exact token sequences instead of a radix tree.

Each entry is keyed by a whole inserted sequence. A query reuses only an entry that is a prefix of
it (the longest one); a match never ends inside an entry, and entries are never split. What is
shared, exactly: an insert whose sequence extends an existing entry E (the longest entry that is a
prefix of it) reuses E's slots for E's tokens and stores only its own tail, so the new entry
depends on E, like a child on its parent, and E is evicted only after it. Sequences that diverge
inside an entry share nothing: both keep their own slots for the common tokens. That is the
memory and compute a radix tree's edge splitting saves, and what the ablation measures.

Eviction, locking and accounting are the radix cache's (`LRUTreeCache`): an entry's chain of
prefix entries plays the role of the path to the root.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from plait.runtime.cache.base import InsertResult, MatchResult, TreeNode, empty_slots
from plait.runtime.cache.radix_cache import LRUTreeCache, stored_copy


class FlatEntry(TreeNode):
    __slots__ = ("full_key",)
    full_key: tuple[int, ...]  # the whole sequence this entry stands for (the table key)


class FlatCache(LRUTreeCache):
    """Exact-prefix table with LRU eviction (the paper's "no tree-structure" ablation)."""

    def _init_tree(self) -> None:
        super()._init_tree()
        self._table: dict[tuple[int, ...], FlatEntry] = {}
        self._entry_lens: Counter[int] = Counter()  # entry length -> number of entries that long

    def _make_node(self, key: list[int], value: torch.Tensor, parent: TreeNode | None) -> FlatEntry:
        entry = FlatEntry(key, value, parent, self._clock)
        entry.full_key = (parent.full_key if parent is not None else ()) + tuple(key)
        return entry

    def _child_key(self, node: TreeNode) -> tuple[int, ...]:
        return node.full_key

    def _on_remove(self, node: TreeNode) -> None:
        del self._table[node.full_key]
        self._entry_lens[len(node.full_key)] -= 1
        if not self._entry_lens[len(node.full_key)]:
            del self._entry_lens[len(node.full_key)]

    def _longest_entry(self, tokens: tuple[int, ...]) -> FlatEntry:
        """The longest entry that is a prefix of `tokens`, or the root."""
        for entry_len in sorted(self._entry_lens, reverse=True):
            if entry_len <= len(tokens):
                entry = self._table.get(tokens[:entry_len])
                if entry is not None:
                    return entry
        return self.root

    def _touch(self, entry: TreeNode) -> None:
        """Refresh the access time of `entry` and the entries it depends on."""
        now = self._tick()
        node = entry
        while node is not self.root:
            node.last_access_time = now
            node = node.parent
        if entry is not self.root and not entry.children and entry.lock_ref == 0:
            self._push(entry)

    def _slots_of(self, entry: TreeNode) -> torch.Tensor:
        values = []
        while entry is not self.root:
            values.append(entry.value)
            entry = entry.parent
        if not values:
            return empty_slots()
        return values[0] if len(values) == 1 else torch.cat(values[::-1])

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        entry = self._longest_entry(tuple(token_ids))
        self._touch(entry)
        self.stats.record_lookup(requested_len=len(token_ids), prefix_len=len(entry.full_key))
        return MatchResult(self._slots_of(entry), entry)

    def insert(self, token_ids: Sequence[int], slot_ids: torch.Tensor) -> InsertResult:
        tokens = tuple(token_ids)
        assert slot_ids.dim() == 1 and slot_ids.numel() == len(tokens)
        entry = self._longest_entry(tokens)
        self._touch(entry)
        prefix_len = len(entry.full_key)
        if prefix_len < len(tokens):
            leaf = self._new_leaf(entry, list(tokens[prefix_len:]), stored_copy(slot_ids[prefix_len:]))
            self._table[tokens] = leaf
            self._entry_lens[len(tokens)] += 1
        return InsertResult(prefix_len, len(tokens))

    def _assert_node_shape(self, node: TreeNode) -> None:
        assert node.full_key == node.parent.full_key + tuple(node.key), f"{node}: full key"
        assert self._table.get(node.full_key) is node, f"{node}: not in the table"

    def assert_integrity(self, *, privately_owned: int = 0) -> None:
        super().assert_integrity(privately_owned=privately_owned)
        assert len(self._table) == self._num_nodes
        assert self._entry_lens == Counter(len(k) for k in self._table)
