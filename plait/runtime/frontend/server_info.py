"""The one server-info shape, returned by `Engine.get_server_info()` and `GET /get_server_info`.

SGLang's shape: the server's arguments at the top level (the resolved runtime configuration, plus
the HTTP server's own settings when there is one), facts about the model, `version`, and
`internal_states`, a list with one `InternalState` per scheduler. The scheduler takes its
snapshot between two steps, where the cache invariants hold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.runtime.frontend.messages import SchedulerReady
    from plait.runtime.scheduler.scheduler import Scheduler


@dataclass
class CacheState:
    hit_rate: float  # cached / admitted prompt tokens, since start (or the last flush)
    prompt_tokens_total: int
    cached_tokens_total: int
    tokens_in_cache: int
    evictable_tokens: int
    protected_tokens: int  # locked by running requests
    evicted_tokens: int
    free_slots: int
    total_slots: int
    free_request_rows: int
    tiers: dict[str, Any] = field(default_factory=dict)  # the tiered cache: settings, sizes, traffic ({} without)


@dataclass
class IntegrityState:
    ok: bool
    idle: bool
    leaked_slots: int
    problems: list[str] = field(default_factory=list)


@dataclass
class InternalState:
    """One scheduler's state."""

    num_running_reqs: int
    num_queue_reqs: int
    num_grammar_queue_reqs: int
    token_usage: float  # share of KV slots held by requests or locked in the cache
    cache: CacheState
    memory: dict[str, Any]  # where the memory went (weights, KV pool, request table, CUDA graphs)
    execution: dict[str, Any]  # which model-execution path runs (dtype, 4-bit decode, graphs, compile)
    scheduler: dict[str, Any]  # step counters
    grammar: dict[str, Any]  # constrained-decoding counters
    integrity: IntegrityState

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["debug"] = {"integrity": out.pop("integrity")}
        return out


def take_snapshot(scheduler: Scheduler, *, idle: bool) -> InternalState:
    runner = scheduler.runner
    cache = scheduler.cache.cache
    stats = cache.stats
    return InternalState(
        num_running_reqs=len(scheduler.running) + (1 if scheduler.chunked else 0),
        num_queue_reqs=len(scheduler.waiting),
        num_grammar_queue_reqs=len(scheduler.constraints.pending),
        token_usage=token_usage(scheduler),
        cache=CacheState(
            hit_rate=stats.hit_rate,
            prompt_tokens_total=stats.prefill_input_tokens,
            cached_tokens_total=stats.prefill_cached_tokens,
            tokens_in_cache=cache.total_size,
            evictable_tokens=cache.evictable_size,
            protected_tokens=cache.protected_size,
            evicted_tokens=stats.evicted_tokens,
            free_slots=runner.allocator.num_free_slots,
            total_slots=runner.kv_pool.num_slots,
            free_request_rows=runner.req_to_token_pool.num_free_rows,
            tiers=scheduler.cache.tiered.tier_info() if scheduler.cache.tiered is not None else {},
        ),
        memory=runner.memory_report._asdict(),
        execution=runner.execution_info(),
        scheduler=dict(scheduler.stats),
        grammar=dict(scheduler.constraints.stats),
        integrity=integrity(scheduler, idle=idle),
    )


def token_usage(scheduler: Scheduler) -> float:
    runner = scheduler.runner
    total = runner.kv_pool.num_slots
    return (total - runner.allocator.num_free_slots - scheduler.cache.cache.evictable_size) / total


def integrity(scheduler: Scheduler, *, idle: bool) -> IntegrityState:
    """`check_integrity()` between two steps; when idle, also that no slot, lock or row is held."""
    runner = scheduler.runner
    cache = scheduler.cache.cache
    active = scheduler.active_requests()
    problems: list[str] = []
    try:
        scheduler.check_integrity()
    except AssertionError as e:
        problems.append(str(e) or "cache integrity assertion failed")
    private = sum(r.kv_committed_len - r.cache_protected_len for r in active if r.req_pool_idx is not None)
    loading = scheduler.cache.tiered.loads.tokens_in_flight if scheduler.cache.tiered is not None else 0
    leaked = runner.kv_pool.num_slots - runner.allocator.num_free_slots - cache.total_size - private - loading
    if idle:
        if cache.protected_size:
            problems.append(f"{cache.protected_size} cached tokens are locked with no request running")
        rows = runner.req_to_token_pool
        if rows.num_free_rows != rows.num_rows:
            problems.append(f"{rows.num_rows - rows.num_free_rows} request rows are held with no request running")
    if leaked:
        problems.append(f"{leaked} KV slots are neither free, cached nor owned by a request")
    return IntegrityState(ok=not problems, idle=idle, leaked_slots=leaked, problems=problems)


def server_info(ready: SchedulerReady, internal_states: list[InternalState], *,
                server_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole dict: arguments, model facts, `internal_states`, `version`."""
    from plait import __version__

    limits = ready.limits
    return {
        **ready.server_args,
        **(server_args or {}),
        "model_path": ready.model_path,
        "tokenizer_path": ready.tokenizer_path,
        "context_length": limits.context_length,
        "vocab_size": limits.vocab_size,
        "max_total_num_tokens": limits.max_total_tokens,
        "max_running_requests": ready.max_running_requests,
        "max_req_input_len": limits.context_length - 1,
        **ready.info,
        "internal_states": [s.to_dict() for s in internal_states],
        "version": __version__,
    }
