"""`plait.Engine`: the runtime in-process, without HTTP.

The scheduler runs on a background thread (PyTorch releases the GIL in its kernels); `generate`
submits requests and waits for, streams, or awaits their outputs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator, Iterator

from plait.runtime.config import RuntimeConfig
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.scheduler.io import AbortRequest, FlushCacheRequest, RequestOutput
from plait.runtime.scheduler.scheduler import Scheduler
from plait.runtime.tokenizer_manager import GenerateInput, InvalidRequestError, RequestState, normalize

logger = logging.getLogger(__name__)


class Engine:
    """Offline inference engine. `Engine()` loads the default model.

    Options are the fields of `plait.runtime.config` (model_path, dtype, max_total_tokens,
    schedule_policy, disable_radix_cache, chunked_prefill_size, ...).
    """

    def __init__(self, model_path: str | None = None, *, source: Any = None, **options: Any):
        """`source`: an already resolved `ModelSource` (tests use in-memory models)."""
        if model_path is not None:
            options["model_path"] = model_path
        self.config = RuntimeConfig.from_options(**options)
        self.runner = ModelRunner(self.config.model, self.config.memory, source=source)
        self.tokenizer = self.runner.tokenizer
        self.scheduler = Scheduler(self.runner, self.config.scheduler, on_output=self._on_output)
        self._states: dict[str, RequestState] = {}
        self._listeners: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="plait-scheduler", daemon=True)
        self._error: BaseException | None = None
        self._thread.start()

    # ---- the scheduler thread -----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self.scheduler.run_forever(self._stop)
        except BaseException as e:  # surface to every waiting caller instead of hanging them
            logger.exception("scheduler failed")
            self._error = e
            with self._lock:
                for listener in self._listeners.values():
                    listener(None)

    def _on_output(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            for out in outputs:
                state = self._states.get(out.rid)
                if state is None:
                    continue
                state.add(out)
                listener = self._listeners.get(out.rid)
                if out.finished:
                    self._states.pop(out.rid, None)
                    self._listeners.pop(out.rid, None)
                if listener is not None:
                    listener(state)

    def _submit(self, inp: GenerateInput, listener_factory) -> tuple[list[RequestState], bool]:
        if self._error is not None:
            raise RuntimeError("the scheduler has stopped") from self._error
        requests, is_batch = normalize(inp, self.tokenizer, default_sampling=self._default_sampling())
        states = [RequestState(r, self.tokenizer) for r in requests]
        with self._lock:
            for state in states:
                if state.request.rid in self._states:
                    raise InvalidRequestError(f"a request with rid {state.request.rid!r} is already running")
            for state in states:
                self._states[state.request.rid] = state
                self._listeners[state.request.rid] = listener_factory(state)
        for state in states:
            self.scheduler.submit(state.request)
        return states, is_batch

    def _default_sampling(self) -> dict:
        gen = self.runner.source.generation_config
        return {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in gen}

    # ---- public API ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        token_ids_logprob: list[int] | list[list[int]] | None = None,
        return_text_in_logprobs: bool = False,
        rid: str | list[str] | None = None,
        stream: bool = False,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict back) or a batch (a list). With `stream=True`, an iterator
        of cumulative snapshots of one request (`text` so far, `meta_info` current)."""
        inp = GenerateInput(
            text=prompt, input_ids=input_ids, sampling_params=sampling_params, rid=rid,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            token_ids_logprob=token_ids_logprob, return_text_in_logprobs=return_text_in_logprobs, stream=stream,
        )
        if stream:
            return self._stream(inp)
        done: dict[str, threading.Event] = {}

        def factory(state: RequestState):
            event = done.setdefault(state.request.rid, threading.Event())
            return lambda s: event.set() if (s is None or s.finished) else None

        states, is_batch = self._submit(inp, factory)
        for state in states:
            done[state.request.rid].wait()
            if self._error is not None and not state.finished:
                raise RuntimeError("the scheduler has stopped") from self._error
        results = [s.result() for s in states]
        return results if is_batch else results[0]

    def _stream(self, inp: GenerateInput) -> Iterator[dict]:
        updates: queue.SimpleQueue = queue.SimpleQueue()
        states, is_batch = self._submit(inp, lambda state: lambda s: updates.put(s))
        if is_batch:
            self.abort_request("")
            raise InvalidRequestError("streaming takes one prompt with n = 1")
        state = states[0]
        try:
            while True:
                s = updates.get()
                if s is None:
                    raise RuntimeError("the scheduler has stopped") from self._error
                yield s.result()
                if s.finished:
                    return
        finally:
            if not state.finished:
                self.abort_request(state.request.rid)

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, stream: bool = False, **kw):
        """Async variant of `generate`: awaits the result, or with `stream=True` returns an async iterator."""
        if stream:
            return self._async_stream(prompt, sampling_params, input_ids, **kw)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future] = []

        def factory(state: RequestState):
            fut = loop.create_future()
            futures.append(fut)

            def on(s):
                if (s is None or s.finished) and not fut.done():
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(s))

            return on

        inp = GenerateInput(text=prompt, input_ids=input_ids, sampling_params=sampling_params, **kw)
        states, is_batch = self._submit(inp, factory)
        await asyncio.gather(*futures)
        if self._error is not None and not all(s.finished for s in states):
            raise RuntimeError("the scheduler has stopped") from self._error
        results = [s.result() for s in states]
        return results if is_batch else results[0]

    async def _async_stream(self, prompt, sampling_params, input_ids, **kw) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        inp = GenerateInput(text=prompt, input_ids=input_ids, sampling_params=sampling_params, stream=True, **kw)
        states, is_batch = self._submit(
            inp, lambda state: lambda s: loop.call_soon_threadsafe(updates.put_nowait, s)
        )
        if is_batch:
            raise InvalidRequestError("streaming takes one prompt with n = 1")
        try:
            while True:
                s = await updates.get()
                if s is None:
                    raise RuntimeError("the scheduler has stopped") from self._error
                yield s.result()
                if s.finished:
                    return
        finally:
            if not states[0].finished:
                self.abort_request(states[0].request.rid)

    def abort_request(self, rid: str = "") -> None:
        """Abort one request by rid, or all with ""; its KV is freed at once."""
        self.scheduler.submit(AbortRequest(rid))

    def flush_cache(self) -> bool:
        """Drop the prefix cache (only when idle); returns whether it was flushed."""
        if self.scheduler.has_work:
            return False
        self.scheduler.submit(FlushCacheRequest())
        return True

    def get_server_info(self) -> dict[str, Any]:
        cache = self.scheduler.cache.cache
        stats = cache.stats
        return {
            "model_path": self.runner.source.path,
            "dtype": str(self.runner.dtype).replace("torch.", ""),
            "device": str(self.runner.device),
            "max_total_tokens": self.runner.kv_pool.num_slots,
            "max_running_requests": self.scheduler.max_running,
            "context_length": self.runner.context_length,
            "schedule_policy": self.scheduler.policy.name,
            "prefix_cache": type(cache).__name__,
            "cache_hit_rate": stats.hit_rate,
            "cached_tokens_total": stats.prefill_cached_tokens,
            "prompt_tokens_total": stats.prefill_input_tokens,
            "tokens_in_cache": cache.total_size,
            "evicted_tokens": stats.evicted_tokens,
            "free_slots": self.runner.allocator.num_free_slots,
            **self.scheduler.stats,
            **{f"grammar_{k}": v for k, v in self.scheduler.constraints.stats.items()},
        }

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.scheduler.constraints.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass
