"""The scheduler process: owns the model, the KV pool and the scheduler; talks ZMQ with the HTTP process.

Its loop wraps `Scheduler.step`: take every message waiting on the socket (generation requests
and aborts go to the scheduler's inbox; queries are answered here, between two steps, where the
cache invariants hold), run one step if there is work, and every so often send and log stats.
Detokenization stays in this process: the scheduler already produces text deltas, so a separate
detokenizer process would only add a hop (docs/architecture.md, "Server processes").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from plait.runtime.scheduler.io import AbortRequest, GenerateRequest, RequestOutput
from plait.runtime.server.messages import (
    FlushCacheQuery,
    InfoQuery,
    QueryReply,
    SchedulerFailed,
    SchedulerReady,
    SchedulerStats,
    Shutdown,
)

logger = logging.getLogger(__name__)

STATS_SEND_INTERVAL_S = 0.5  # how often the HTTP process hears running/queued/usage numbers while busy


@dataclass(frozen=True)
class SchedulerProcessArgs:
    runtime_options: dict[str, Any]
    requests_address: str  # HTTP -> scheduler
    outputs_address: str  # scheduler -> HTTP
    log_level: str = "info"
    stats_log_interval: float = 5.0
    parent_pid: int = 0


def run_scheduler_process(args: SchedulerProcessArgs) -> None:
    """Entry point of the process (a `multiprocessing` spawn target). Exits 1 on any failure,
    after telling the HTTP process why."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s scheduler: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the HTTP process decides
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(args.requests_address)
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)
    outbox.connect(args.outputs_address)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            process = SchedulerProcess.load(args, inbox, outbox)
            process.run()
        except BaseException as e:  # anything: the HTTP process must hear of it, not wait forever
            logger.exception("the scheduler failed")
            outbox.send_pyobj(SchedulerFailed(f"{type(e).__name__}: {e}"))
            failure.append(e)

    # The loop runs on a second thread, as in `Engine`. On a loaded 2-core machine we measured torch's
    # CPU kernels launched from the main thread several times slower than from another thread (a
    # [1, 64] x [64, 49152] matmul: 6-16 ms against 1-2 ms); unloaded, both take 0.4 ms.
    thread = threading.Thread(target=work, name="plait-scheduler")
    thread.start()
    thread.join()
    inbox.close(linger=0)
    outbox.close(linger=2000)  # deliver the last outputs or the failure message
    context.term()
    sys.exit(1 if failure else 0)


class SchedulerProcess:
    def __init__(self, runner: Any, config: Any, inbox: zmq.Socket, outbox: zmq.Socket, args: SchedulerProcessArgs):
        from plait.runtime.scheduler.scheduler import Scheduler

        self.runner = runner
        self.config = config
        self.inbox = inbox
        self.outbox = outbox
        self.args = args
        self.scheduler = Scheduler(runner, config.scheduler, on_output=self._send_outputs)
        self.stopping = False
        self.stats = _StatsReporter(self, log_interval=args.stats_log_interval)

    @classmethod
    def load(cls, args: SchedulerProcessArgs, inbox: zmq.Socket, outbox: zmq.Socket) -> "SchedulerProcess":
        from plait.runtime.config import RuntimeConfig
        from plait.runtime.executor.model_runner import ModelRunner

        config = RuntimeConfig.from_options(**args.runtime_options)
        runner = ModelRunner(config.model, config.memory)
        process = cls(runner, config, inbox, outbox, args)
        outbox.send_pyobj(process.ready_message())
        return process

    def ready_message(self) -> SchedulerReady:
        runner, sched = self.runner, self.scheduler
        gen = runner.source.generation_config
        return SchedulerReady(
            tokenizer=runner.tokenizer,
            model_path=runner.source.path,
            tokenizer_path=self.config.model.tokenizer_path or runner.source.path,
            context_length=runner.context_length,
            vocab_size=runner.vocab_size,
            max_total_tokens=runner.kv_pool.num_slots,
            max_running_requests=sched.max_running,
            default_sampling={k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                              if gen.get(k) is not None},
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
        last_parent_check = time.monotonic()
        while not self.stopping:
            busy = self._busy
            # Idle: wait on the socket. Grammars compiling (work, but nothing to run yet): wait briefly,
            # their completion lands in the scheduler's own inbox.
            if self.inbox.poll(0 if busy else 10 if self.scheduler.has_work else 100):
                self._receive_all()
                if self.stopping:
                    break
            if self._busy:
                self.scheduler.step()
            self.stats.tick()
            if not busy and time.monotonic() - last_parent_check > 1.0:  # cheap enough when idle
                last_parent_check = time.monotonic()
                if self.args.parent_pid and os.getppid() != self.args.parent_pid:
                    logger.warning("the HTTP process is gone; exiting")
                    return

    @property
    def _busy(self) -> bool:
        """Something to run now (a step would make progress)."""
        s = self.scheduler
        return bool(s.waiting or s.running or s.chunked) or not s.inbox.empty()

    @property
    def _idle(self) -> bool:
        return not self.scheduler.has_work and self.scheduler.inbox.empty()

    def _receive_all(self) -> None:
        while True:
            try:
                msg = self.inbox.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(msg)

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, (GenerateRequest, AbortRequest)):
            self.scheduler.submit(msg)
        elif isinstance(msg, InfoQuery):
            self.outbox.send_pyobj(QueryReply(msg.query_id, self.server_info()))
        elif isinstance(msg, FlushCacheQuery):
            flushed = self._idle
            if flushed:
                self.scheduler.cache.flush()
            self.outbox.send_pyobj(QueryReply(msg.query_id, flushed))
        elif isinstance(msg, Shutdown):
            self.scheduler.submit(AbortRequest(""))
            self.scheduler.step()  # sends the aborted requests' final outputs
            self.stopping = True
        else:
            logger.error("unknown message %r", type(msg).__name__)

    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        self.outbox.send_pyobj(outputs)

    # ---- state for /get_server_info ------------------------------------------------------------
    def server_info(self) -> dict[str, Any]:
        sched, runner = self.scheduler, self.runner
        cache = sched.cache.cache
        stats = cache.stats
        return {
            "num_running_reqs": len(sched.running) + (1 if sched.chunked else 0),
            "num_queue_reqs": len(sched.waiting),
            "token_usage": self.token_usage(),
            "cache": {
                "hit_rate": stats.hit_rate,
                "prompt_tokens_total": stats.prefill_input_tokens,
                "cached_tokens_total": stats.prefill_cached_tokens,
                "tokens_in_cache": cache.total_size,
                "evictable_tokens": cache.evictable_size,
                "protected_tokens": cache.protected_size,
                "evicted_tokens": stats.evicted_tokens,
                "free_slots": runner.allocator.num_free_slots,
                "total_slots": runner.kv_pool.num_slots,
                "free_request_rows": runner.req_to_token_pool.num_free_rows,
            },
            "scheduler": dict(sched.stats),
            "debug": {"integrity": self.integrity()},
        }

    def token_usage(self) -> float:
        cache = self.scheduler.cache.cache
        total = self.runner.kv_pool.num_slots
        return (total - self.runner.allocator.num_free_slots - cache.evictable_size) / total

    def integrity(self) -> dict[str, Any]:
        """`check_integrity()` between two steps; when idle, also that no slot, lock or row is held."""
        sched, runner = self.scheduler, self.runner
        cache = sched.cache.cache
        active = sched.active_requests()
        problems: list[str] = []
        try:
            sched.check_integrity()
        except AssertionError as e:
            problems.append(str(e) or "cache integrity assertion failed")
        private = sum(r.kv_committed_len - r.cache_protected_len for r in active if r.req_pool_idx is not None)
        leaked = runner.kv_pool.num_slots - runner.allocator.num_free_slots - cache.total_size - private
        idle = self._idle
        if idle:
            if cache.protected_size:
                problems.append(f"{cache.protected_size} cached tokens are locked with no request running")
            rows = runner.req_to_token_pool
            if rows.num_free_rows != rows.num_rows:
                problems.append(f"{rows.num_rows - rows.num_free_rows} request rows are held with no request running")
        if leaked:
            problems.append(f"{leaked} KV slots are neither free, cached nor owned by a request")
        return {"ok": not problems, "idle": idle, "leaked_slots": leaked, "problems": problems}


class _StatsReporter:
    """Running/queued/usage numbers to the HTTP process (for /metrics) and a periodic log line."""

    def __init__(self, process: SchedulerProcess, *, log_interval: float):
        self.process = process
        self.log_interval = log_interval
        now = time.monotonic()
        self.last_sent = self.last_logged = now
        self.was_busy = False
        self.sent_tokens = self.logged_tokens = 0
        self.logged_prompt_tokens = 0

    def tick(self) -> None:
        sched = self.process.scheduler
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
        sched = self.process.scheduler
        tokens = sched.stats["generated_tokens"]
        elapsed = max(now - self.last_sent, 1e-6)
        self.process.outbox.send_pyobj(SchedulerStats(
            num_running=len(sched.running) + (1 if sched.chunked else 0),
            num_waiting=len(sched.waiting),
            token_usage=self.process.token_usage(),
            cache_hit_rate=sched.cache.cache.stats.hit_rate,
            gen_throughput=(tokens - self.sent_tokens) / elapsed,
        ))
        self.sent_tokens, self.last_sent = tokens, now

    def _log(self, now: float) -> None:
        sched = self.process.scheduler
        stats = sched.cache.cache.stats
        elapsed = max(now - self.last_logged, 1e-6)
        tokens, prompt_tokens = sched.stats["generated_tokens"], stats.prefill_input_tokens
        logger.info(
            "running %d, queued %d, generation %.1f tok/s, prompt %.1f tok/s, cache hit rate %.1f%%,"
            " token usage %.1f%%",
            len(sched.running) + (1 if sched.chunked else 0), len(sched.waiting),
            (tokens - self.logged_tokens) / elapsed, (prompt_tokens - self.logged_prompt_tokens) / elapsed,
            100 * stats.hit_rate, 100 * self.process.token_usage(),
        )
        self.logged_tokens, self.logged_prompt_tokens, self.last_logged = tokens, prompt_tokens, now
