"""The router's state, without HTTP: the workers, their health and load, and the routing decision.

A worker is in the pool while healthy. It leaves after `health_failure_threshold` consecutive
failures (health checks, or requests it could not take) and comes back after
`health_success_threshold` consecutive passed health checks; a worker that just joined is checked
before it gets requests. Leaving clears the policy's memory of it (its cache is assumed lost).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from plait.router.config import RouterConfig
from plait.router.policy import CacheAwareConfig, Decision, RoutingPolicy, WorkerLoad, make_policy

logger = logging.getLogger("plait.router")


@dataclass
class Worker:
    url: str
    healthy: bool = False
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive passed checks while out of the pool
    in_flight: int = 0
    requests_total: int = 0
    failures_total: int = 0
    decisions: dict[str, int] = field(default_factory=dict)  # reason -> count
    matched_chars: int = 0  # of the keys routed here, what the tree said this worker had seen
    key_chars: int = 0

    @property
    def estimated_hit_rate(self) -> float:
        """The router's guess of this worker's prefix-cache hit rate (matched share of routed keys)."""
        return self.matched_chars / self.key_chars if self.key_chars else 0.0


class NoWorkerAvailable(Exception):
    pass


class Router:
    def __init__(self, config: RouterConfig, *, policy: RoutingPolicy | None = None):
        self.config = config
        self.policy = policy or make_policy(config.policy, cache_aware=CacheAwareConfig(
            cache_threshold=config.cache_threshold, balance_abs_threshold=config.balance_abs_threshold,
            balance_rel_threshold=config.balance_rel_threshold, max_tree_size=config.max_tree_size,
            max_tree_age=config.max_tree_age))
        self.workers: dict[str, Worker] = {}
        for url in config.worker_urls:
            self.add_worker(url)
        self.retries_total = 0

    def add_worker(self, url: str) -> Worker:
        url = url.rstrip("/")
        if url not in self.workers:
            self.workers[url] = Worker(url)
            logger.info("worker %s added (in the pool after its first health check)", url)
        return self.workers[url]

    def remove_worker(self, url: str) -> bool:
        url = url.rstrip("/")
        if self.workers.pop(url, None) is None:
            return False
        self.policy.remove_worker(url)
        logger.info("worker %s removed", url)
        return True

    @property
    def healthy(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy]

    def select(self, key: str, *, exclude: frozenset[str] = frozenset()) -> tuple[Worker, Decision]:
        """Pick a healthy worker not in `exclude` for a request with routing key `key`; counts it as
        in flight (call `finished` when it ends)."""
        candidates = [w for w in self.healthy if w.url not in exclude]
        if not candidates:
            raise NoWorkerAvailable("no healthy worker" + (" left to retry on" if exclude else ""))
        decision = self.policy.select([WorkerLoad(w.url, w.in_flight) for w in candidates], key)
        worker = self.workers[decision.worker]
        worker.in_flight += 1
        worker.requests_total += 1
        worker.decisions[decision.reason] = worker.decisions.get(decision.reason, 0) + 1
        worker.matched_chars += decision.matched_chars
        worker.key_chars += len(key)
        return worker, decision

    def finished(self, worker: Worker) -> None:
        worker.in_flight = max(0, worker.in_flight - 1)

    # ---- health ------------------------------------------------------------------------------------
    def record_failure(self, worker: Worker, why: str) -> None:
        worker.failures += 1
        worker.failures_total += 1
        worker.successes = 0
        if worker.healthy and worker.failures >= self.config.health_failure_threshold:
            worker.healthy = False
            self.policy.remove_worker(worker.url)
            logger.warning("worker %s out of the pool after %d failures (%s)", worker.url, worker.failures, why)

    def record_success(self, worker: Worker) -> None:
        worker.failures = 0
        if worker.healthy:
            return
        worker.successes += 1
        first_check = worker.failures_total == 0 and worker.requests_total == 0
        if first_check or worker.successes >= self.config.health_success_threshold:
            worker.healthy = True
            worker.successes = 0
            logger.info("worker %s in the pool", worker.url)

    def retried(self) -> None:
        self.retries_total += 1
