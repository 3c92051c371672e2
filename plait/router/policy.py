"""Routing policies: which worker gets a request. One registry; `--policy` / `--load-balance-method`
take their choices from it. Torch-free: the router and the server's data-parallel front end share it.

A policy sees the healthy workers (`WorkerLoad`: a name and the requests in flight there) and the
request's routing key (its text, or its token ids as `tree.token_key`) and returns a name.

`cache_aware` (SGLang's router policy, after the paper's "route the request to the worker with
the matching cache"):

    if loads are imbalanced (max - min > abs_threshold and max > min * rel_threshold):
        the least loaded worker
    else:
        the worker whose tree holds the longest prefix of the key, if that prefix is more than
        cache_threshold of the key; else the worker on the fewest cached characters
    then remember key -> chosen worker in the tree
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

from plait.router.tree import ApproxRadixTree


class WorkerLoad(NamedTuple):
    name: str
    load: int  # requests sent and not yet finished


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.5  # share of the key a worker must have seen to win on affinity
    balance_abs_threshold: int = 32  # loads count as imbalanced only when they differ by more than this ...
    balance_rel_threshold: float = 1.1  # ... and the largest exceeds the smallest times this
    max_tree_size: int = 1 << 22  # characters remembered per worker; beyond, least recently used go
    max_tree_age: float = 3600.0  # seconds an unused entry is remembered


class Decision(NamedTuple):
    worker: str
    reason: str  # "affinity", "balance", "smallest" (cache_aware), or the policy's name
    matched_chars: int = 0


class RoutingPolicy:
    name = ""

    def select(self, workers: list[WorkerLoad], key: str) -> Decision:
        """`workers` is never empty."""
        raise NotImplementedError

    def remove_worker(self, name: str) -> None:
        """`name` left the pool (removed, or failing): forget what is known of it."""

    def prune(self) -> None:
        """Periodic upkeep (the cache-aware tree's eviction)."""


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self.counter = 0

    def select(self, workers: list[WorkerLoad], key: str) -> Decision:
        pick = workers[self.counter % len(workers)]
        self.counter += 1
        return Decision(pick.name, self.name)


class Random(RoutingPolicy):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def select(self, workers: list[WorkerLoad], key: str) -> Decision:
        return Decision(self.rng.choice(workers).name, self.name)


class PowerOfTwo(RoutingPolicy):
    """The less loaded of two workers drawn at random."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def select(self, workers: list[WorkerLoad], key: str) -> Decision:
        if len(workers) == 1:
            return Decision(workers[0].name, self.name)
        a, b = self.rng.sample(workers, 2)
        return Decision((a if a.load <= b.load else b).name, self.name)


class CacheAware(RoutingPolicy):
    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.config = config or CacheAwareConfig()
        self.tree = ApproxRadixTree()
        self.clock = clock

    def select(self, workers: list[WorkerLoad], key: str) -> Decision:
        cfg = self.config
        loads = [w.load for w in workers]
        hi, lo = max(loads), min(loads)
        if hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
            decision = Decision(min(workers, key=lambda w: w.load).name, "balance")
        else:
            names = [w.name for w in workers]
            match = self.tree.prefix_match(key, frozenset(names))
            if match.tenant is not None and key and match.matched_chars / len(key) > cfg.cache_threshold:
                decision = Decision(match.tenant, "affinity", match.matched_chars)
            else:
                decision = Decision(self.tree.smallest_tenant(names), "smallest", match.matched_chars)
        self.tree.insert(key, decision.worker, self.clock())
        return decision

    def remove_worker(self, name: str) -> None:
        self.tree.remove_tenant(name)

    def prune(self) -> None:
        self.tree.evict_older_than(self.clock() - self.config.max_tree_age)
        for tenant in list(self.tree.tenant_chars):
            self.tree.evict_tenant(tenant, self.config.max_tree_size)


ROUTING_POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "cache_aware": CacheAware,
    "round_robin": RoundRobin,
    "random": Random,
    "power_of_two": PowerOfTwo,
}


def make_policy(name: str, *, cache_aware: CacheAwareConfig | None = None, seed: int | None = None) -> RoutingPolicy:
    if name not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(ROUTING_POLICIES)}")
    if name == "cache_aware":
        return CacheAware(cache_aware)
    if name in ("random", "power_of_two"):
        return ROUTING_POLICIES[name](seed)
    return ROUTING_POLICIES[name]()
