"""Prometheus metrics (`/metrics`, with --enable-metrics), named like SGLang's with a `plait:` prefix.

Latencies are measured in the HTTP process, where a request's outputs arrive (the scheduler
streams every request's tokens to it), with `time.monotonic()`; the scheduler's own numbers
(running, queued, token usage, cache hit rate) come from its periodic `SchedulerStats`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from plait.runtime.frontend.messages import RequestOutput, SchedulerStats
from plait.runtime.frontend.tracker import HEALTH_CHECK_PREFIX, RequestState

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """One registry per server (tests run several apps in one process)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._model_name = model_name
        self._hicache: dict[str, tuple[Counter | None, int]] = {}
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"plait:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"plait:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"plait:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_running_reqs = gauge("num_running_reqs", "Requests being prefilled or decoded")
        self.num_queue_reqs = gauge("num_queue_reqs", "Requests waiting in the scheduler's queue")
        self.token_usage = gauge("token_usage", "Share of KV slots in use (held by requests or locked in the cache)")
        self.cache_hit_rate = gauge("cache_hit_rate", "Share of admitted prompt tokens served from the prefix cache")
        self.gen_throughput = gauge("gen_throughput", "Generated tokens per second (recent)")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests")
        self.cached_tokens = counter("cached_tokens", "Prompt tokens served from the prefix cache")
        self.num_requests = counter("num_requests", "Finished requests")
        self.num_aborted_requests = counter("num_aborted_requests", "Requests that ended aborted")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between two output tokens", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to last token", _LATENCY_BUCKETS)
        self.num_preparing_reqs = gauge(
            "num_preparing_reqs", "HTTP requests being parsed and tokenized (off the event loop)")
        # A data-parallel server (--dp-size): each replica's load and cache hit rate.
        self.model_name = model_name

        def per_replica(name: str, doc: str) -> Gauge:
            return Gauge(f"plait:replica_{name}", doc, ["model_name", "replica"], registry=r)

        self.replica_gauges = {
            "num_running": per_replica("num_running_reqs", "Requests being prefilled or decoded, by replica"),
            "num_waiting": per_replica("num_queue_reqs", "Requests waiting in the queue, by replica"),
            "token_usage": per_replica("token_usage", "Share of KV slots in use, by replica"),
            "cache_hit_rate": per_replica("cache_hit_rate", "Prefix-cache hit rate, by replica"),
        }

    def on_stats(self, stats: SchedulerStats) -> None:
        for name, total in stats.hicache.items():
            self._hicache_counter(name, total)
        self.num_running_reqs.set(stats.num_running)
        self.num_queue_reqs.set(stats.num_waiting)
        self.token_usage.set(stats.token_usage)
        self.cache_hit_rate.set(stats.cache_hit_rate)
        self.gen_throughput.set(stats.gen_throughput)
        for i, replica in enumerate(stats.replicas):
            for field_name, gauge in self.replica_gauges.items():
                gauge.labels(self.model_name, str(i)).set(getattr(replica, field_name))

    def on_output(self, state: RequestState, out: RequestOutput) -> None:
        if out.rid.startswith(HEALTH_CHECK_PREFIX):
            return
        if state.timing is None:
            state.timing = RequestTiming()
        timing = state.timing
        now = time.monotonic()
        num_new = len(out.new_output_ids)
        if num_new:
            if timing.first_token_time is None:
                timing.first_token_time = now
                self.ttft.observe(now - timing.arrival_time)
            else:
                gap = (now - timing.last_token_time) / num_new
                for _ in range(num_new):
                    self.itl.observe(gap)
            timing.last_token_time = now
        if out.finished:
            self.e2e.observe(now - timing.arrival_time)
            self.num_requests.inc()
            self.prompt_tokens.inc(out.prompt_tokens)
            self.generation_tokens.inc(out.completion_tokens)
            self.cached_tokens.inc(out.cached_tokens)
            if (out.finish_reason or {}).get("type") == "abort":
                self.num_aborted_requests.inc()

    def _hicache_counter(self, name: str, total: int) -> None:
        """The tiered cache's cumulative counters as `plait:hicache_<name>_total` (created when first seen)."""
        counter, seen = self._hicache.get(name, (None, 0))
        if counter is None:
            counter = Counter(f"plait:hicache_{name}", f"Tiered KV cache: {name.replace('_', ' ')}", ["model_name"],
                              registry=self.registry).labels(self._model_name)
        if total > seen:
            counter.inc(total - seen)
        self._hicache[name] = (counter, max(total, seen))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTiming:
    __slots__ = ("arrival_time", "first_token_time", "last_token_time")

    def __init__(self) -> None:
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time = self.arrival_time
