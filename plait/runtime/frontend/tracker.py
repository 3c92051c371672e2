"""The front end's bookkeeping of requests in flight: each request's accumulated result
(`RequestState`), the requests of one call (`RequestGroup`), and the rid table (`RequestTracker`).

Outputs arrive on the transport's thread (the scheduler thread for the `Engine`, the event loop
for the HTTP server) and are folded into their `RequestState`; the group's waiter is woken, on
whatever thread or event loop it waits. Aborts are by exact rid; the copies that `n > 1` or a
batch made of one rid are listed explicitly under that rid, never found by a prefix match.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from plait.runtime.frontend.errors import InvalidRequestError, RequestError, SchedulerUnavailable, error_for_status
from plait.runtime.frontend.messages import STATUS_CLIENT_ABORT, GenerateRequest, RequestOutput

HEALTH_CHECK_PREFIX = "HEALTH_CHECK_"  # rids of internal health-check generations (not counted, not metered)


@dataclass
class RequestState:
    """Accumulates a request's outputs into SGLang's response shape (`text`, `output_ids`, `meta_info`)."""

    request: GenerateRequest
    tokenizer: Any
    parent_rids: tuple[str, ...] = ()
    created: float = field(default_factory=time.perf_counter)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    logprobs: dict[str, list] = field(default_factory=lambda: {
        "input_token_logprobs": [], "output_token_logprobs": [], "input_top_logprobs": [],
        "output_top_logprobs": [], "input_token_ids_logprobs": [], "output_token_ids_logprobs": [],
    })
    last_delta: str = ""
    timing: Any = None  # the server's latency record (metrics), if it keeps one

    @property
    def rid(self) -> str:
        return self.request.rid

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.last_delta = out.new_text
        if out.num_dropped_ids:  # jump-forward retokenized the tail
            del self.output_ids[-out.num_dropped_ids :]
        self.output_ids.extend(out.new_output_ids)
        self.finished = out.finished
        self.meta = {
            "id": self.request.rid,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
        }
        if out.num_retractions:
            self.meta["num_retractions"] = out.num_retractions
        if out.finished:
            self.meta["e2e_latency"] = time.perf_counter() - self.created
        if self.request.return_logprob:
            for key in self.logprobs:
                self.logprobs[key].extend(getattr(out, key))

    def error(self) -> RequestError | None:
        """The error this request finished with: an abort with a 4xx or 5xx status other than a
        client's abort (499). A refused grammar is a 400, a failure inside the server a 500."""
        reason = self.meta.get("finish_reason") or {}
        status = int(reason.get("status_code") or 0) if reason.get("type") == "abort" else 0
        if status >= 400 and status != STATUS_CLIENT_ABORT:
            return error_for_status(status, str(reason.get("message")))
        return None

    def result(self) -> dict[str, Any]:
        meta = dict(self.meta)
        if self.request.return_logprob:
            with_text = self.request.return_text_in_logprobs
            for key, entries in self.logprobs.items():
                if key.endswith("token_logprobs"):
                    meta[key] = [self._triple(lp, tid, with_text) for lp, tid in entries]
                elif key.endswith("top_logprobs"):
                    if self.request.top_logprobs_num:
                        meta[key] = [None if e is None else [self._triple(lp, t, with_text) for lp, t in e]
                                     for e in entries]
                elif self.request.token_ids_logprob:
                    meta[key] = [None if e is None else [self._triple(lp, t, with_text) for lp, t in e]
                                 for e in entries]
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    def _triple(self, logprob: float | None, token_id: int, with_text: bool) -> list:
        text = self.tokenizer.id_to_token_text(token_id) if (with_text and self.tokenizer is not None) else None
        return [logprob, token_id, text]


class RequestGroup:
    """The requests of one call (a batch, n copies). Its waiter is woken when any of them changes;
    it may wait with `updates()` on an event loop or `sync_updates()` on a thread."""

    def __init__(self, states: list[RequestState]):
        self.states = states
        self.failure: str | None = None  # the scheduler died: no more outputs will come
        self.closed = False  # unfinished requests were aborted; the caller is done with the group
        self._lock = threading.Lock()
        self._changed: set[int] = set()
        self._notified_final: set[int] = set()  # states whose final output has been notified
        self._started = False  # some output arrived
        self._thread_event = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_event: asyncio.Event | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.states)

    def notify(self, index: int) -> None:
        """Called after the state's output was applied, so a final output is in place before its
        index is recorded as changed and as final (together, under the lock)."""
        with self._lock:
            self._changed.add(index)
            if self.states[index].finished:
                self._notified_final.add(index)
            self._started = True
        self._wake()

    def fail(self, message: str) -> None:
        self.failure = message
        self._wake()

    def _wake(self) -> None:
        self._thread_event.set()
        loop, event = self._loop, self._async_event
        if loop is None or event is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    def _take(self) -> tuple[list[int], bool]:
        """The indexes changed since the last take, and whether every final output is among what has
        now been taken. The waiters stop on that, never on `finished` read after a yield: an output
        applied while the consumer handled the last batch would then never be handed out."""
        with self._lock:
            changed = sorted(self._changed)
            self._changed.clear()
            done = len(self._notified_final) == len(self.states)
        return changed, done

    def _check_failure(self) -> None:
        if self.failure is not None:
            raise SchedulerUnavailable(self.failure)

    # ---- waiting on an event loop ------------------------------------------------------------------
    def _bind(self) -> asyncio.Event:
        if self._async_event is None:
            self._loop = asyncio.get_running_loop()
            self._async_event = asyncio.Event()
        event = self._async_event
        if self._changed or self.failure is not None:
            event.set()  # something arrived before the waiter bound itself
        return event

    async def updates(self) -> AsyncIterator[list[int]]:
        """Indexes of the states that changed, in batches, until all are finished.
        Raises SchedulerUnavailable if the scheduler dies meanwhile."""
        event = self._bind()
        while True:
            await event.wait()
            event.clear()
            self._check_failure()
            changed, done = self._take()
            if changed:
                yield changed
            if done:
                return

    async def wait(self) -> None:
        async for _ in self.updates():
            pass

    async def wait_started(self) -> None:
        """Until the first output of any request arrives (without taking it from `updates`)."""
        event = self._bind()
        while not self._started:
            self._check_failure()
            await event.wait()
            event.clear()
        self._check_failure()
        event.set()  # leave the wake-up for `updates`

    # ---- waiting on a thread ----------------------------------------------------------------------------
    def sync_updates(self) -> Iterator[list[int]]:
        while True:
            self._thread_event.wait()
            self._thread_event.clear()
            self._check_failure()
            changed, done = self._take()
            if changed:
                yield changed
            if done:
                return

    def sync_wait(self) -> None:
        for _ in self.sync_updates():
            pass

    def raise_errors(self) -> None:
        """Raise the first error a finished request of the group ended with."""
        for s in self.states:
            error = s.error() if s.finished else None
            if error is not None:
                raise error


class RequestTracker:
    """rid -> (group, index) for every request in flight, and each derived-from rid -> its copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_rid: dict[str, tuple[RequestGroup, int]] = {}
        self._copies: dict[str, list[str]] = {}

    def add(self, group: RequestGroup) -> None:
        """Register a group; its rids (and the rids they were derived from) must not be in flight."""
        with self._lock:
            for state in group.states:
                for name in (state.rid, *state.parent_rids):
                    if name in self._by_rid or (name == state.rid and name in self._copies):
                        raise InvalidRequestError(f"a request with rid {name!r} is already running", param="rid")
            for i, state in enumerate(group.states):
                self._by_rid[state.rid] = (group, i)
                for parent in state.parent_rids:
                    self._copies.setdefault(parent, []).append(state.rid)

    def on_output(self, out: RequestOutput) -> RequestState | None:
        """Fold one output into its request; None if the request is no longer tracked."""
        with self._lock:
            entry = self._by_rid.get(out.rid)
            if entry is None:
                return None  # given up on already (an abort raced with the last output)
            group, index = entry
            state = group.states[index]
            state.add(out)
            if out.finished:
                self._forget(state)
        group.notify(index)
        return state

    def forget(self, state: RequestState) -> None:
        with self._lock:
            self._forget(state)

    def _forget(self, state: RequestState) -> None:
        if self._by_rid.get(state.rid, (None, 0))[0] is None:
            return
        del self._by_rid[state.rid]
        for parent in state.parent_rids:
            copies = self._copies.get(parent)
            if copies is not None:
                copies.remove(state.rid)
                if not copies:
                    del self._copies[parent]

    def resolve(self, rid: str) -> list[str]:
        """The requests an abort of `rid` means: the one with exactly that rid, and the copies made from it."""
        with self._lock:
            found = [rid] if rid in self._by_rid else []
            return found + [r for r in self._copies.get(rid, []) if r != rid]

    def fail_all(self, message: str) -> None:
        with self._lock:
            groups = {id(g): g for g, _ in self._by_rid.values()}
            self._by_rid.clear()
            self._copies.clear()
        for group in groups.values():
            group.fail(message)

    def rids(self) -> list[str]:
        with self._lock:
            return list(self._by_rid)

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return sum(1 for rid in self._by_rid if not rid.startswith(HEALTH_CHECK_PREFIX))
