"""Data parallelism inside one server: a transport over several scheduler replicas (`--dp-size`).

Each request goes to one replica, chosen by a routing policy (plait/router/policy.py; cache_aware
by default, over the prompt's token ids, so requests that share a prefix meet the replica whose
cache holds it). Aborts go to the replica that has the request; queries go to every replica and
their replies are combined into one (a list of scheduler states for the server info); the
replicas' stats are summed. The front end sees one scheduler that is ready when every replica is,
and dead when any replica dies.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from plait.router.policy import RoutingPolicy, WorkerLoad, make_policy
from plait.router.tree import token_key
from plait.runtime.frontend.messages import (
    AbortRequest,
    FlushCacheQuery,
    FromScheduler,
    GenerateRequest,
    InfoQuery,
    OutputBatch,
    QueryReply,
    SchedulerFailed,
    SchedulerReady,
    SchedulerStats,
    ToScheduler,
)
from plait.runtime.frontend.transport import Deliver, Transport

logger = logging.getLogger(__name__)


class DataParallelTransport(Transport):
    def __init__(self, replicas: list[Any], *, policy: str | RoutingPolicy = "cache_aware"):
        assert replicas
        self.replicas = replicas
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        n = len(replicas)
        self.in_flight = [0] * n
        self.dispatched = [0] * n
        self.owner: dict[str, int] = {}  # rid -> replica, until the request finishes
        self.ready: list[SchedulerReady | None] = [None] * n
        self.stats: list[SchedulerStats | None] = [None] * n
        self._queries: dict[int, tuple[type, dict[int, Any]]] = {}  # query id -> (kind, replies by replica)
        self._deliver: Deliver | None = None
        self._lock = threading.Lock()

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        for i, replica in enumerate(self.replicas):
            replica.start(lambda msg, i=i: self._on_message(i, msg))

    def send(self, msg: ToScheduler) -> None:
        if isinstance(msg, GenerateRequest):
            with self._lock:
                workers = [WorkerLoad(str(i), load) for i, load in enumerate(self.in_flight)]
                i = int(self.policy.select(workers, token_key(msg.input_ids)).worker)
                self.owner[msg.rid] = i
                self.in_flight[i] += 1
                self.dispatched[i] += 1
            self.replicas[i].send(msg)
        elif isinstance(msg, AbortRequest) and msg.rid:
            i = self.owner.get(msg.rid)
            if i is not None:  # else it finished already
                self.replicas[i].send(msg)
        else:
            if isinstance(msg, (InfoQuery, FlushCacheQuery)):
                with self._lock:
                    self._queries[msg.query_id] = (type(msg), {})
            for replica in self.replicas:
                replica.send(msg)

    async def close(self, *, tell_scheduler: bool, timeout: float = 5.0) -> None:
        for replica in self.replicas:
            await replica.close(tell_scheduler=tell_scheduler, timeout=timeout)

    def describe(self) -> dict[str, Any]:
        """For the server info: the replicas, their load and cache hit rate."""
        return {
            "dp_size": len(self.replicas),
            "load_balance_method": self.policy.name,
            "replicas": [
                {"replica": i, "in_flight": self.in_flight[i], "dispatched": self.dispatched[i],
                 "cache_hit_rate": s.cache_hit_rate if s is not None else None}
                for i, s in enumerate(self.stats)
            ],
        }

    # ---- from the replicas ----------------------------------------------------------------------
    def _on_message(self, i: int, msg: FromScheduler) -> None:
        assert self._deliver is not None
        if isinstance(msg, OutputBatch):
            with self._lock:
                for out in msg.outputs:
                    if out.finished and self.owner.pop(out.rid, None) is not None:
                        self.in_flight[i] -= 1
            self._deliver(msg)
        elif isinstance(msg, SchedulerStats):
            self.stats[i] = msg
            # Replicas that have not reported yet count as idle.
            idle = SchedulerStats(0, 0, 0.0, 0.0, 0.0)
            self._deliver(_combined_stats([s if s is not None else idle for s in self.stats]))
        elif isinstance(msg, QueryReply):
            with self._lock:
                kind, replies = self._queries.get(msg.query_id, (None, {}))
                replies[i] = msg.result
                done = kind is not None and len(replies) == len(self.replicas)
                if done:
                    del self._queries[msg.query_id]
            if done:
                ordered = [replies[k] for k in range(len(self.replicas))]
                self._deliver(QueryReply(msg.query_id, ordered if kind is InfoQuery else all(ordered)))
        elif isinstance(msg, SchedulerReady):
            self.ready[i] = msg
            if all(r is not None for r in self.ready):
                first = self.ready[0]
                assert first is not None
                total = sum(r.limits.max_total_tokens for r in self.ready if r is not None)
                info = {**first.info, "dp_size": len(self.replicas), "load_balance_method": self.policy.name,
                        "max_total_num_tokens_all_replicas": total}
                self._deliver(dataclasses.replace(
                    first, max_running_requests=sum(r.max_running_requests for r in self.ready if r is not None),
                    info=info))
        elif isinstance(msg, SchedulerFailed):
            self._deliver(SchedulerFailed(f"data-parallel replica {i}: {msg.message}"))
        else:
            self._deliver(msg)


def _combined_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    return SchedulerStats(
        num_running=sum(s.num_running for s in stats),
        num_waiting=sum(s.num_waiting for s in stats),
        token_usage=sum(s.token_usage for s in stats) / len(stats),
        cache_hit_rate=sum(s.cache_hit_rate for s in stats) / len(stats),
        gen_throughput=sum(s.gen_throughput for s in stats),
        hicache={k: sum(s.hicache.get(k, 0) for s in stats) for k in {k for s in stats for k in s.hicache}},
        replicas=list(stats),
    )
