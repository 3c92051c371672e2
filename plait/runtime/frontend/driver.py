"""The one scheduler driver loop, the same in the `Engine`'s thread and in the server's scheduler process.

    receive messages -> (requests and aborts to the scheduler, queries answered) -> step -> stats

Queries (`InfoQuery`, `FlushCacheQuery`) are answered here, between two steps, where the cache
invariants hold. The driver talks to its front end only through a `SchedulerChannel` (a queue
in-process, ZMQ sockets across processes) and never dies on a request's data: the scheduler
validates each request on arrival and rejects what it cannot run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from plait.runtime.frontend.messages import (
    STATUS_UNAVAILABLE,
    AbortRequest,
    FlushCacheQuery,
    FromScheduler,
    GenerateRequest,
    InfoQuery,
    OutputBatch,
    QueryReply,
    RequestOutput,
    SchedulerReady,
    SchedulerStats,
    Shutdown,
    ToScheduler,
    WorkflowUpdate,
)
from plait.runtime.frontend.server_info import take_snapshot, token_usage
from plait.runtime.frontend.validate import Limits

if TYPE_CHECKING:
    from plait.runtime.config import RuntimeConfig
    from plait.runtime.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

STATS_SEND_INTERVAL_S = 0.5  # how often the front end hears running/queued/usage numbers while busy


class SchedulerChannel(Protocol):
    """The scheduler's end of a transport."""

    def receive(self, timeout: float) -> list[ToScheduler]:
        """Every message waiting, after waiting up to `timeout` seconds for the first."""

    def send(self, msg: FromScheduler) -> None:
        """Never blocks."""


class SchedulerDriver:
    def __init__(self, runner: ModelRunner, config: RuntimeConfig, channel: SchedulerChannel, *,
                 stats_log_interval: float = 0.0):
        from plait.runtime.scheduler.scheduler import Scheduler

        self.runner = runner
        self.config = config
        self.channel = channel
        self.scheduler = Scheduler(runner, config.scheduler, on_output=self._send_outputs)
        self.stopping = False
        self.stats = StatsReporter(self, log_interval=stats_log_interval)

    def ready_message(self) -> SchedulerReady:
        runner, sched = self.runner, self.scheduler
        gen = runner.source.generation_config
        return SchedulerReady(
            tokenizer=runner.tokenizer,
            model_path=runner.source.path,
            tokenizer_path=self.config.model.tokenizer_path or runner.source.path,
            limits=Limits(context_length=runner.context_length, vocab_size=runner.vocab_size,
                          max_total_tokens=runner.kv_pool.num_slots,
                          grammar_backend=self.config.scheduler.grammar_backend),
            max_running_requests=sched.max_running,
            default_sampling={k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                              if gen.get(k) is not None},
            server_args=runtime_args(self.config),
            info={
                "dtype": str(runner.dtype).replace("torch.", ""),
                "device": str(runner.device),
                "load_format": runner.source.load_format,
                "architecture": type(runner.model).__name__,
                "schedule_policy": sched.policy.name,
                "prefix_cache": type(sched.cache.cache).__name__,
                "chunked_prefill_size": sched.chunk_size,
                "max_prefill_tokens": sched.max_prefill_tokens,
            },
        )

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Until a `Shutdown` message."""
        self.channel.send(self.ready_message())
        while not self.stopping:
            # Idle: wait for a message. Grammars compiling (work, but nothing to run yet): wait briefly;
            # their completion lands in the scheduler's own inbox.
            timeout = 0.0 if self._busy else 0.01 if self.scheduler.has_work else 0.1
            for msg in self.channel.receive(timeout):
                self.handle(msg)
            if self.stopping:
                break
            if self._busy:
                self.scheduler.step()
            self.stats.tick()
        if self.scheduler.cache.tiered is not None:
            self.scheduler.cache.tiered.close()  # the loader thread, the file tier's temporary folder

    @property
    def _busy(self) -> bool:
        """Something to run now (a step would make progress)."""
        s = self.scheduler
        return bool(s.waiting or s.running or s.chunked or s.inflight is not None) or not s.inbox.empty()

    @property
    def idle(self) -> bool:
        return not self.scheduler.has_work and self.scheduler.inbox.empty()

    def handle(self, msg: ToScheduler) -> None:
        if isinstance(msg, (GenerateRequest, AbortRequest, WorkflowUpdate)):
            self.scheduler.submit(msg)
        elif isinstance(msg, InfoQuery):
            self.channel.send(QueryReply(msg.query_id, take_snapshot(self.scheduler, idle=self.idle)))
        elif isinstance(msg, FlushCacheQuery):
            self.channel.send(QueryReply(msg.query_id, self.idle and self.scheduler.flush_cache()))
        elif isinstance(msg, Shutdown):
            self.scheduler.submit(AbortRequest("", "the server is shutting down", STATUS_UNAVAILABLE))
            self.scheduler.step()  # sends the aborted requests' final outputs
            self.stopping = True
        else:
            logger.error("unknown message %r", type(msg).__name__)

    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        self.channel.send(OutputBatch(outputs))


def runtime_args(config: RuntimeConfig) -> dict[str, Any]:
    """The runtime configuration as flat `name: value` pairs (the flags' names)."""
    args: dict[str, Any] = {}
    for section in (config.model, config.memory, config.scheduler):
        args.update(dataclasses.asdict(section))
    return args


class StatsReporter:
    """Running/queued/usage numbers to the front end (for /metrics) and a periodic log line."""

    def __init__(self, driver: SchedulerDriver, *, log_interval: float):
        self.driver = driver
        self.log_interval = log_interval
        now = time.monotonic()
        self.last_sent = self.last_logged = now
        self.was_busy = False
        self.sent_tokens = self.logged_tokens = 0
        self.logged_prompt_tokens = 0

    def tick(self) -> None:
        sched = self.driver.scheduler
        busy = sched.has_work
        now = time.monotonic()
        if busy and now - self.last_sent >= STATS_SEND_INTERVAL_S or (self.was_busy and not busy):
            self._send(now)
        if busy and self.log_interval > 0 and now - self.last_logged >= self.log_interval:
            self._log(now)
        if busy and not self.was_busy:
            self.last_logged = now  # the first line covers a full interval of work
            self.logged_tokens = sched.stats["generated_tokens"]
            self.logged_prompt_tokens = sched.cache.cache.stats.prefill_input_tokens
        self.was_busy = busy

    def _send(self, now: float) -> None:
        sched = self.driver.scheduler
        tokens = sched.stats["generated_tokens"]
        elapsed = max(now - self.last_sent, 1e-6)
        self.driver.channel.send(SchedulerStats(
            num_running=len(sched.running) + (1 if sched.chunked else 0),
            num_waiting=len(sched.waiting),
            token_usage=token_usage(sched),
            cache_hit_rate=sched.cache.cache.stats.hit_rate,
            gen_throughput=(tokens - self.sent_tokens) / elapsed,
            hicache=sched.cache.tiered.tier_stats.flat() if sched.cache.tiered is not None else {},
        ))
        self.sent_tokens, self.last_sent = tokens, now

    def _log(self, now: float) -> None:
        sched = self.driver.scheduler
        stats = sched.cache.cache.stats
        elapsed = max(now - self.last_logged, 1e-6)
        tokens, prompt_tokens = sched.stats["generated_tokens"], stats.prefill_input_tokens
        logger.info(
            "running %d, queued %d, generation %.1f tok/s, prompt %.1f tok/s, cache hit rate %.1f%%,"
            " token usage %.1f%%",
            len(sched.running) + (1 if sched.chunked else 0), len(sched.waiting),
            (tokens - self.logged_tokens) / elapsed, (prompt_tokens - self.logged_prompt_tokens) / elapsed,
            100 * stats.hit_rate, 100 * token_usage(sched),
        )
        self.logged_tokens, self.logged_prompt_tokens, self.last_logged = tokens, prompt_tokens, now
