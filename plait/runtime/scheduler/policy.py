"""Waiting-queue policies, chosen by name.

- `lpm`: longest cached prefix first (the paper's cache-aware scheduling).
- `dfs-weight`: depth-first over the radix tree, heavier subtrees first (keeps a shared prefix hot
  while all requests under it run).
- `fcfs`, `lof` (longest output first), `random`.

Cache-aware policies fall back to fcfs when the queue is longer than `LONG_QUEUE` (matching every
request each round would cost more than it saves). **Aging** removes the starvation the paper names
as an open problem: a request passed over in `aging_rounds` admission rounds goes ahead of every
younger one, so under any policy a request waits at most `aging_rounds` rounds plus the rounds
needed to admit the older aged requests ahead of it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

from plait.runtime.scheduler.cache_manager import CacheManager
from plait.runtime.scheduler.request import Req

LONG_QUEUE = 128


def _fcfs(queue: list[Req], cache: CacheManager) -> list[Req]:
    return sorted(queue, key=lambda r: r.arrival_time)


def _lpm(queue: list[Req], cache: CacheManager) -> list[Req]:
    for req in queue:
        cache.match(req)
    return sorted(queue, key=lambda r: (-r.prefix_len, r.arrival_time))


def _lof(queue: list[Req], cache: CacheManager) -> list[Req]:
    return sorted(queue, key=lambda r: (-r.max_new_tokens, r.arrival_time))


def _random(queue: list[Req], cache: CacheManager) -> list[Req]:
    order = list(queue)
    random.shuffle(order)
    return order


def _dfs_weight(queue: list[Req], cache: CacheManager) -> list[Req]:
    by_node: dict[int, list[Req]] = defaultdict(list)
    weight: dict[int, int] = defaultdict(int)
    nodes = {}
    for req in queue:
        cache.match(req)
        node = req.pending_match.last_node
        by_node[id(node)].append(req)
        while node is not None:  # every ancestor's subtree holds this request
            weight[id(node)] += 1
            nodes[id(node)] = node
            node = node.parent
    order: list[Req] = []
    # Depth first, heavier subtrees first, a node's own requests after its children's: requests that
    # extend a shared prefix further run while that prefix is hot; the unmatched (root) ones come last.
    stack: list[tuple[object, bool]] = [(cache.cache.root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.extend(sorted(by_node.get(id(node), []), key=lambda r: r.arrival_time))
            continue
        stack.append((node, True))
        children = [c for c in node.children.values() if weight.get(id(c))]
        stack.extend((c, False) for c in sorted(children, key=lambda c: weight[id(c)]))  # heaviest popped first
    if len(order) != len(queue):  # requests matched onto nodes outside the walk (flat/none caches)
        seen = {id(r) for r in order}
        order.extend(r for r in _fcfs(queue, cache) if id(r) not in seen)
    return order


SCHEDULE_POLICIES: dict[str, Callable[[list[Req], CacheManager], list[Req]]] = {
    "lpm": _lpm,
    "dfs-weight": _dfs_weight,
    "fcfs": _fcfs,
    "lof": _lof,
    "random": _random,
}
_CACHE_AWARE = {"lpm", "dfs-weight"}


class SchedulePolicy:
    def __init__(self, name: str, *, aging_rounds: int):
        if name not in SCHEDULE_POLICIES:
            raise ValueError(f"unknown schedule policy {name!r}; choose from {', '.join(SCHEDULE_POLICIES)}")
        self.name = name
        self.aging_rounds = aging_rounds

    def order(self, queue: list[Req], cache: CacheManager) -> list[Req]:
        """The waiting queue in the order admission should try it. Every request is matched
        against the cache (fresh `prefix_len`) by the time admission looks at it."""
        name = self.name
        if name in _CACHE_AWARE and len(queue) > LONG_QUEUE:
            name = "fcfs"
        ordered = SCHEDULE_POLICIES[name](queue, cache)
        if self.aging_rounds > 0:
            aged = [r for r in ordered if r.times_passed_over >= self.aging_rounds]
            if aged:
                aged.sort(key=lambda r: r.arrival_time)
                aged_ids = {id(r) for r in aged}
                ordered = aged + [r for r in ordered if id(r) not in aged_ids]
        return ordered
