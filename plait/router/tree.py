"""An approximate radix tree of what each worker has probably cached (the cache-aware router's
memory of past requests).

The router never sees the workers' real caches. It remembers the text of the requests it sent to
each worker (its "tenant") in one radix tree over characters, shared by all tenants: every node
records which tenants passed through it and when. A match tells how much of a new request's
prefix a tenant has seen. Workers evict on their own, so the tree is only a guess: a stale entry
costs a cache miss, never a wrong answer. The tree is pruned by size (each tenant's characters
beyond a limit, least recently used leaves first) and by age.

Token ids route the same way as text: `token_key` turns them into a string, one character per id.

Invariant (`check_integrity`): a tenant on a node is on its parent too, and each tenant's
character count is the sum of the edge lengths of the nodes it is on.
"""

from __future__ import annotations

import heapq
import itertools
from typing import NamedTuple


def token_key(token_ids: list[int]) -> str:
    """A string with one character per token id, so token sequences use the same tree as text."""
    return "".join(map(chr, token_ids))


class _Node:
    __slots__ = ("text", "children", "parent", "tenants")

    def __init__(self, text: str, parent: "_Node | None"):
        self.text = text  # the edge from the parent
        self.children: dict[str, _Node] = {}  # by first character
        self.parent = parent
        self.tenants: dict[str, float] = {}  # tenant -> last access time


class PrefixMatch(NamedTuple):
    matched_chars: int  # of the query, seen by `tenant`
    tenant: str | None  # None: no allowed tenant shares a first character with the query


class ApproxRadixTree:
    def __init__(self) -> None:
        self.root = _Node("", None)
        self.tenant_chars: dict[str, int] = {}  # characters of the tree each tenant is on

    # ---- updates -----------------------------------------------------------------------------------
    def insert(self, text: str, tenant: str, now: float) -> None:
        """Record that `tenant` was sent `text`: every node on its path gets the tenant, stamped `now`."""
        self.tenant_chars.setdefault(tenant, 0)
        node, i = self.root, 0  # the root (the empty prefix) carries no tenants
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(text[i:], node)
                node.children[text[i]] = child
                self._touch(child, tenant, now)
                return
            common = _common_prefix_len(child.text, text, i)
            if common < len(child.text):
                child = self._split(child, common)
            self._touch(child, tenant, now)
            node, i = child, i + common

    def _touch(self, node: _Node, tenant: str, now: float) -> None:
        if tenant not in node.tenants:
            self.tenant_chars[tenant] += len(node.text)
        node.tenants[tenant] = now

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut `child`'s edge after `at` characters; returns the new upper node (same tenants)."""
        parent = child.parent
        assert parent is not None and 0 < at < len(child.text)
        upper = _Node(child.text[:at], parent)
        upper.tenants = dict(child.tenants)  # the character counts do not change: same total length
        parent.children[upper.text[0]] = upper
        child.text = child.text[at:]
        child.parent = upper
        upper.children[child.text[0]] = child
        return upper

    def remove_tenant(self, tenant: str) -> None:
        """Forget everything `tenant` was sent (a worker removed from the pool)."""
        for node in list(self._nodes()):
            if node.tenants.pop(tenant, None) is not None:
                self._drop_if_empty(node)
        self.tenant_chars.pop(tenant, None)

    def evict_tenant(self, tenant: str, max_chars: int) -> int:
        """Remove `tenant` from its least recently used leaves until it is on at most `max_chars`
        characters. Returns the characters removed."""
        removed = 0
        counter = itertools.count()
        heap = [(n.tenants[tenant], next(counter), n) for n in self._nodes() if tenant in n.tenants
                and n is not self.root and not any(tenant in c.tenants for c in n.children.values())]
        heapq.heapify(heap)
        while heap and self.tenant_chars.get(tenant, 0) > max_chars:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del node.tenants[tenant]
            self.tenant_chars[tenant] -= len(node.text)
            removed += len(node.text)
            self._drop_if_empty(node)
            # The parent becomes the tenant's leaf once none of its children carries the tenant.
            if (parent is not None and parent is not self.root and tenant in parent.tenants
                    and not any(tenant in c.tenants for c in parent.children.values())):
                heapq.heappush(heap, (parent.tenants[tenant], next(counter), parent))
        return removed

    def evict_older_than(self, cutoff: float) -> None:
        """Remove every (tenant, node) entry last used before `cutoff`. Ancestors are used no earlier
        than their descendants (an insert stamps the whole path), so the invariant holds."""
        for node in sorted(self._nodes(), key=_depth, reverse=True):
            if node is self.root:
                continue
            for tenant, t in list(node.tenants.items()):
                if t < cutoff:
                    del node.tenants[tenant]
                    self.tenant_chars[tenant] -= len(node.text)
            self._drop_if_empty(node)

    def _drop_if_empty(self, node: _Node) -> None:
        while node is not self.root and not node.tenants and not node.children:
            parent = node.parent
            assert parent is not None
            del parent.children[node.text[0]]
            node = parent

    # ---- queries ---------------------------------------------------------------------------------
    def prefix_match(self, text: str, allowed: set[str] | frozenset[str]) -> PrefixMatch:
        """The allowed tenant that has seen the longest prefix of `text`, and that prefix's length
        (ties: the most recently used)."""
        node, i, best = self.root, 0, PrefixMatch(0, None)
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            candidates = {t: s for t, s in child.tenants.items() if t in allowed}
            if not candidates:
                break
            common = _common_prefix_len(child.text, text, i)
            best = PrefixMatch(i + common, max(candidates, key=candidates.__getitem__))
            if common < len(child.text):
                break
            node, i = child, i + common
        return best

    def smallest_tenant(self, allowed: list[str]) -> str:
        """The allowed tenant on the fewest characters (presumably the most free cache)."""
        return min(allowed, key=lambda t: self.tenant_chars.get(t, 0))

    @property
    def num_nodes(self) -> int:
        return sum(1 for _ in self._nodes())

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_integrity(self) -> None:
        chars: dict[str, int] = {}
        for node in self._nodes():
            if node is self.root:
                continue
            assert node.text and node.parent is not None and node.parent.children[node.text[0]] is node
            assert node.tenants or node.children, "an empty leaf was left behind"
            for tenant in node.tenants:
                assert node.parent is self.root or tenant in node.parent.tenants, "a tenant skips its parent"
                chars[tenant] = chars.get(tenant, 0) + len(node.text)
        for tenant, n in self.tenant_chars.items():
            assert chars.get(tenant, 0) == n, f"{tenant}: counted {n} characters, holds {chars.get(tenant, 0)}"


def _common_prefix_len(edge: str, text: str, start: int) -> int:
    n = min(len(edge), len(text) - start)
    if edge[:n] == text[start : start + n]:
        return n
    lo, hi = 0, n  # the first difference, by halving (string comparisons run in C)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if edge[:mid] == text[start : start + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _depth(node: _Node) -> int:
    d = 0
    while node.parent is not None:
        node, d = node.parent, d + 1
    return d
