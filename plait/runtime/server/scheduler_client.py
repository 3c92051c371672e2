"""The HTTP process's side of the scheduler: ZMQ sockets, in-flight requests, readiness and liveness.

Requests go out on a PUSH socket (non-blocking sends, so an abort can be sent from a `finally`
of a cancelled task); outputs come back on a PULL socket read by one asyncio task that folds
each `RequestOutput` into its `RequestState` and wakes the HTTP handler waiting on it. A
watchdog notices when the scheduler process dies: every pending request fails with a 5xx error,
health turns 503, and `on_dead` lets the launcher shut the server down with an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, AsyncIterator, Callable

import zmq
import zmq.asyncio

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
from plait.runtime.server.metrics import RequestTiming, ServerMetrics
from plait.runtime.tokenizer_manager import InvalidRequestError, RequestState
from plait.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HEALTH_CHECK_PREFIX = "HEALTH_CHECK_"


class SchedulerUnavailable(RuntimeError):
    """The scheduler process is not ready, has died, or stopped answering."""


class RequestGroup:
    """The scheduler requests made for one HTTP request; one event wakes the handler for all of them."""

    def __init__(self, states: list[RequestState]):
        self.states = states
        self.error: str | None = None
        self.closed = False  # ServerState.finish ran: unfinished requests were aborted
        self._changed: set[int] = set()
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.states)

    def notify(self, index: int) -> None:
        self._changed.add(index)
        self._event.set()

    def fail(self, message: str) -> None:
        self.error = message
        self._event.set()

    async def updates(self) -> AsyncIterator[list[int]]:
        """Indexes of the states that changed, in batches, until all are finished.
        Raises SchedulerUnavailable if the scheduler dies meanwhile."""
        while True:
            await self._event.wait()
            self._event.clear()
            if self.error is not None:
                raise SchedulerUnavailable(self.error)
            changed = sorted(self._changed)
            self._changed.clear()
            if changed:
                yield changed
            if self.finished:
                return

    async def wait(self) -> None:
        async for _ in self.updates():
            pass


class _Tracked:
    __slots__ = ("group", "index", "timing")

    def __init__(self, group: RequestGroup, index: int):
        self.group = group
        self.index = index
        self.timing = RequestTiming()


class SchedulerClient:
    def __init__(self, requests_address: str, outputs_address: str, *, metrics: ServerMetrics | None = None,
                 process: Any = None, on_dead: Callable[[str], None] | None = None):
        """Binds both sockets; `process` (a multiprocessing.Process) is watched for death."""
        self._sync_context = zmq.Context()
        self._push = self._sync_context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never block the event loop; the scheduler drains it
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(requests_address)
        self._async_context = zmq.asyncio.Context()
        self._pull = self._async_context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(outputs_address)
        self.metrics = metrics
        self.process = process
        self.on_dead = on_dead
        self.ready: SchedulerReady | None = None
        self.ready_event = asyncio.Event()
        self.dead: str | None = None
        self.last_stats: SchedulerStats | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._queries: dict[int, asyncio.Future] = {}
        self._query_ids = itertools.count()
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._watchdog())]

    async def close(self, *, timeout: float = 5.0) -> None:
        """Ask the scheduler process to abort everything and exit; wait for it (then force it)."""
        for task in self._tasks:  # its exit is expected now: the watchdog must not call it a failure
            task.cancel()
        if self.dead is None and self.ready is not None:
            self._send(Shutdown())
        if self.process is not None:
            deadline = time.monotonic() + timeout
            while self.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.process.is_alive():
                logger.warning("the scheduler process did not exit in %.0f s; terminating it", timeout)
                self.process.terminate()
                self.process.join(2)
        self.dead = self.dead or "the server is shutting down"
        self._pull.close()
        self._push.close()
        self._sync_context.term()
        self._async_context.term()

    @property
    def is_ready(self) -> bool:
        return self.ready is not None and self.dead is None

    @property
    def num_in_flight(self) -> int:
        return sum(1 for rid in self._tracked if not rid.startswith(HEALTH_CHECK_PREFIX))

    def rids(self) -> list[str]:
        return list(self._tracked)

    # ---- requests --------------------------------------------------------------------------------
    def submit(self, states: list[RequestState]) -> RequestGroup:
        """Send the requests of one HTTP request; their rids must not be in flight already."""
        self.check_available()
        rids = [s.request.rid for s in states]
        clash = next((r for r in rids if r in self._tracked), None)
        if clash is not None or len(set(rids)) != len(rids):
            clash = clash or next(r for r in rids if rids.count(r) > 1)
            raise InvalidRequestError(f"a request with rid {clash!r} is already running")
        group = RequestGroup(states)
        for i, state in enumerate(states):
            self._tracked[state.request.rid] = _Tracked(group, i)
        for state in states:
            self._send(state.request)
        return group

    def abort(self, rid: str) -> None:
        """Abort one request ("" for all). Safe to call from a cancelled task: it never awaits."""
        if self.dead is None and self.ready is not None:
            self._send(AbortRequest(rid))

    def check_available(self) -> None:
        if self.dead is not None:
            raise SchedulerUnavailable(self.dead)
        if self.ready is None:
            raise SchedulerUnavailable("the server is still starting: the model is loading")

    def _send(self, msg: Any) -> None:
        try:
            self._push.send_pyobj(msg, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise SchedulerUnavailable(f"cannot reach the scheduler process: {e}") from e

    async def query_info(self, timeout: float = 30.0) -> dict[str, Any]:
        return await self._query(InfoQuery, timeout)

    async def flush_cache(self, timeout: float = 30.0) -> bool:
        return await self._query(FlushCacheQuery, timeout)

    async def _query(self, cls: type, timeout: float) -> Any:
        self.check_available()
        query_id = next(self._query_ids)
        future = asyncio.get_running_loop().create_future()
        self._queries[query_id] = future
        try:
            self._send(cls(query_id))
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise SchedulerUnavailable(f"the scheduler did not answer within {timeout:.0f} s") from None
        finally:
            self._queries.pop(query_id, None)

    async def health_generate(self, timeout: float) -> bool:
        """One greedy token through the whole path; True as soon as any output arrives."""
        if not self.is_ready:
            return False
        rid = f"{HEALTH_CHECK_PREFIX}{time.time_ns()}"
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        params.normalize()
        state = RequestState(GenerateRequest(rid=rid, input_ids=[0], sampling_params=params, stream=True), None)
        group = self.submit([state])
        try:
            await asyncio.wait_for(group.wait(), timeout)
            return state.finished and (state.meta.get("finish_reason") or {}).get("type") != "abort"
        except (asyncio.TimeoutError, SchedulerUnavailable):
            return False
        finally:
            if not state.finished:
                self.abort(rid)
            self._tracked.pop(rid, None)

    # ---- the reader and the watchdog ----------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            msg = await self._pull.recv_pyobj()
            try:
                self._dispatch(msg)
            except Exception:  # a bug in one handler must not stop every request
                logger.exception("handling a %s from the scheduler failed", type(msg).__name__)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, list):
            for out in msg:
                self._on_output(out)
        elif isinstance(msg, SchedulerStats):
            self.last_stats = msg
            if self.metrics is not None:
                self.metrics.on_stats(msg)
        elif isinstance(msg, QueryReply):
            future = self._queries.get(msg.query_id)
            if future is not None and not future.done():
                future.set_result(msg.result)
        elif isinstance(msg, SchedulerReady):
            self.ready = msg
            self.ready_event.set()
        elif isinstance(msg, SchedulerFailed):
            self.fail(f"the scheduler process failed: {msg.message}")

    def _on_output(self, out: RequestOutput) -> None:
        tracked = self._tracked.get(out.rid)
        if tracked is None:
            return  # already given up on (an abort raced with the last output)
        state = tracked.group.states[tracked.index]
        state.add(out)
        if self.metrics is not None and not out.rid.startswith(HEALTH_CHECK_PREFIX):
            self.metrics.on_output(tracked.timing, out)
        if out.finished:
            del self._tracked[out.rid]
        tracked.group.notify(tracked.index)

    async def _watchdog(self) -> None:
        while self.dead is None:
            await asyncio.sleep(0.2)
            if self.process is not None and not self.process.is_alive():
                self.fail(f"the scheduler process exited unexpectedly (exit code {self.process.exitcode})")

    def fail(self, message: str) -> None:
        """Mark the scheduler dead: fail every pending request and query, turn health to 503, tell `on_dead`."""
        if self.dead is not None:
            return
        logger.error("%s", message)
        self.dead = message
        for tracked in list(self._tracked.values()):
            tracked.group.fail(message)
        self._tracked.clear()
        for future in self._queries.values():
            if not future.done():
                future.set_exception(SchedulerUnavailable(message))
        self.ready_event.set()  # wake anyone waiting for readiness: it will not come
        if self.on_dead is not None:
            self.on_dead(message)
