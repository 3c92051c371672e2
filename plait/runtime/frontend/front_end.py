"""The one front end of the runtime, shared by the in-process `Engine` and the HTTP server.

    input (dict or GenerateReqInput) --prepare--> RequestStates (normalized, validated, tokenized)
        --submit--> tracker + transport --> scheduler --> outputs --> tracker --> the group's waiter

`prepare` tokenizes and validates against the model's `Limits`, so a bad request fails before it
is sent; `submit` registers the requests (exact rids, copies listed under the rid they came from)
and sends them; every message from the scheduler arrives through `_deliver`. Queries return
`concurrent.futures.Future`s: the `Engine` waits on them, the server awaits them.
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, NamedTuple, Protocol

from plait.runtime.frontend.errors import InvalidRequestError, SchedulerUnavailable
from plait.runtime.frontend.inputs import GenerateReqInput, parse_generate_input
from plait.runtime.frontend.messages import (
    STATUS_CLIENT_ABORT,
    AbortRequest,
    FlushCacheQuery,
    FromScheduler,
    InfoQuery,
    OutputBatch,
    QueryReply,
    RequestOutput,
    SchedulerFailed,
    SchedulerReady,
    SchedulerStats,
    WorkflowUpdate,
)
from plait.runtime.frontend.normalize import normalize
from plait.runtime.frontend.server_info import server_info
from plait.runtime.frontend.tracker import RequestGroup, RequestState, RequestTracker
from plait.runtime.frontend.transport import Transport
from plait.runtime.frontend.validate import Limits

logger = logging.getLogger(__name__)


class Prepared(NamedTuple):
    states: list[RequestState]
    is_batch: bool  # the caller asked for a list of results


class Observer(Protocol):
    """Sees every output and stats message (the server's metrics)."""

    def on_output(self, state: RequestState, out: RequestOutput) -> None: ...

    def on_stats(self, stats: SchedulerStats) -> None: ...


class FrontEnd:
    def __init__(self, transport: Transport, *, server_args: dict[str, Any] | None = None,
                 observer: Observer | None = None, on_dead: Callable[[str], None] | None = None):
        """`server_args`: settings of the process around the runtime (the HTTP server's), shown in
        the server info beside the runtime's own."""
        self.transport = transport
        self.server_args = server_args or {}
        self.observer = observer
        self.on_dead = on_dead
        self.tracker = RequestTracker()
        self.ready: SchedulerReady | None = None
        self.ready_event = threading.Event()  # set when ready or dead
        self.dead: str | None = None
        self.last_stats: SchedulerStats | None = None
        self._queries: dict[int, tuple[Future, Callable[[Any], Any]]] = {}
        self._query_ids = itertools.count()
        self._lock = threading.Lock()

    def start(self) -> None:
        self.transport.start(self._deliver)

    # ---- state -------------------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self.ready is not None and self.dead is None

    def check_available(self) -> SchedulerReady:
        if self.dead is not None:
            raise SchedulerUnavailable(self.dead)
        if self.ready is None:
            raise SchedulerUnavailable("the server is still starting: the model is loading")
        return self.ready

    @property
    def limits(self) -> Limits:
        return self.check_available().limits

    @property
    def num_in_flight(self) -> int:
        return self.tracker.num_in_flight

    # ---- requests ------------------------------------------------------------------------------------
    def prepare(self, data: dict[str, Any] | GenerateReqInput, *, stream_internally: bool = False) -> Prepared:
        """Parse, tokenize, expand (batch, n) and validate; raise InvalidRequestError on bad input.
        CPU-heavy for long prompts: the server calls it off its event loop.

        `stream_internally`: have the scheduler send every token, even for a non-streaming request
        (the server measures latencies as tokens arrive)."""
        ready = self.check_available()
        inp = data if isinstance(data, GenerateReqInput) else parse_generate_input(data)
        normalized = normalize(inp, ready.tokenizer, ready.limits, default_sampling=ready.default_sampling)
        states = []
        for item in normalized.items:
            r = item.request
            # Not with min_new_tokens and stop strings: the scheduler trims such a stop only within the
            # last output, so streaming would leak the part of it sent before.
            if stream_internally and not (r.sampling_params.min_new_tokens and r.sampling_params.stop):
                r.stream = True
            states.append(RequestState(r, ready.tokenizer, parent_rids=item.parent_rids))
        return Prepared(states, normalized.is_batch)

    def submit(self, states: list[RequestState]) -> RequestGroup:
        """Register and send; raises InvalidRequestError if a rid is already in flight."""
        self.check_available()
        group = RequestGroup(states)
        self.tracker.add(group)
        try:
            for state in states:
                self.transport.send(state.request)
        except SchedulerUnavailable:
            for state in states:
                self.tracker.forget(state)
            raise
        return group

    def abort(self, rid: str, *, message: str = "aborted by the client", status: int = STATUS_CLIENT_ABORT) -> list[str]:
        """Abort the request with exactly this rid and the copies made from it (n > 1, a batch given
        one rid). Returns the rids aborted. Safe to call from a cancelled task: it never waits."""
        rids = self.tracker.resolve(rid)
        for r in rids:
            self._send_quietly(AbortRequest(r, message, status))
        return rids

    def publish_workflow(self, workflow_id: str, steps: list[dict[str, Any]], current_step: str | None = None) -> None:
        """Publish an agent workflow's step graph (`WorkflowUpdate`); InvalidRequestError if it is not one."""
        from plait.runtime.cache.workflow import StepGraph

        self.check_available()
        if not isinstance(workflow_id, str) or not workflow_id:
            raise InvalidRequestError("workflow_id must be a non-empty string", param="workflow_id")
        try:
            graph = StepGraph.from_dicts(steps)
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidRequestError(f"invalid step graph: {e}", param="steps") from None
        if current_step is not None and current_step not in graph.steps:
            raise InvalidRequestError(f"current_step {current_step!r} is not a step of the graph", param="current_step")
        self.transport.send(WorkflowUpdate(workflow_id, [dict(s) for s in steps], current_step))

    def abort_all(self, *, message: str = "aborted by the client", status: int = STATUS_CLIENT_ABORT) -> None:
        self._send_quietly(AbortRequest("", message, status))

    def finish(self, group: RequestGroup) -> None:
        """The caller is done with the group: abort what is unfinished (a client gone, an error). Once."""
        if group.closed:
            return
        group.closed = True
        for s in group.states:
            if not s.finished:
                self._send_quietly(AbortRequest(s.rid))

    def _send_quietly(self, msg: Any) -> None:
        if self.dead is None and self.ready is not None:
            try:
                self.transport.send(msg)
            except SchedulerUnavailable:
                pass  # nothing left to abort

    # ---- queries -------------------------------------------------------------------------------------
    def query_info(self) -> Future[dict[str, Any]]:
        """The server info (`server_info.py`), with a fresh snapshot of the scheduler."""
        ready = self.check_available()

        def convert(reply: Any) -> dict[str, Any]:
            # One state per scheduler: a list from the replicas of a data-parallel server.
            states = reply if isinstance(reply, list) else [reply]
            return server_info(ready, states, server_args={**self.server_args, **self.transport.describe()})

        return self._query(InfoQuery, convert)

    def flush_cache(self) -> Future[bool]:
        """True if the cache was flushed, False if requests were running."""
        return self._query(FlushCacheQuery, bool)

    def _query(self, cls: type, convert: Callable[[Any], Any]) -> Future:
        self.check_available()
        future: Future = Future()
        with self._lock:
            query_id = next(self._query_ids)
            self._queries[query_id] = (future, convert)
        try:
            self.transport.send(cls(query_id))
        except SchedulerUnavailable:
            with self._lock:
                self._queries.pop(query_id, None)
            raise
        return future

    def forget_query(self, future: Future) -> None:
        """Stop waiting for a query's reply (its caller timed out)."""
        with self._lock:
            for query_id, (f, _) in list(self._queries.items()):
                if f is future:
                    del self._queries[query_id]

    # ---- messages from the scheduler ----------------------------------------------------------------
    def _deliver(self, msg: FromScheduler) -> None:
        if isinstance(msg, OutputBatch):
            for out in msg.outputs:
                state = self.tracker.on_output(out)
                if state is not None and self.observer is not None:
                    self.observer.on_output(state, out)
        elif isinstance(msg, SchedulerStats):
            self.last_stats = msg
            if self.observer is not None:
                self.observer.on_stats(msg)
        elif isinstance(msg, QueryReply):
            with self._lock:
                entry = self._queries.pop(msg.query_id, None)
            if entry is not None and not entry[0].done():
                future, convert = entry
                try:
                    future.set_result(convert(msg.result))
                except Exception as e:  # a bug in the conversion must reach the waiter, not the reader
                    future.set_exception(e)
        elif isinstance(msg, SchedulerReady):
            self.ready = msg
            self.ready_event.set()
        elif isinstance(msg, SchedulerFailed):
            self.fail(msg.message)
        else:
            logger.error("unknown message %r", type(msg).__name__)

    def fail(self, message: str) -> None:
        """The scheduler is gone: fail every pending request and query, and tell `on_dead`."""
        if self.dead is not None:
            return
        logger.error("%s", message)
        self.dead = message
        self.tracker.fail_all(message)
        with self._lock:
            queries, self._queries = list(self._queries.values()), {}
        for future, _ in queries:
            if not future.done():
                future.set_exception(SchedulerUnavailable(message))
        self.ready_event.set()  # wake anyone waiting for readiness: it will not come
        if self.on_dead is not None:
            self.on_dead(message)

