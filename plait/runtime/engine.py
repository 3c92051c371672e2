"""`plait.Engine`: the runtime in-process, without HTTP.

The Engine is the front end (`plait.runtime.frontend`) over the in-process transport: the same
request normalisation, validation, rid tracking, driver loop and server-info snapshot as the HTTP
server, with the scheduler on a background thread instead of in another process. A bad request
raises the error the server would answer with (`InvalidRequestError` for its 400s), and leaves
the engine working.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, AsyncIterator, Iterator

from plait.runtime.config import RuntimeConfig
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.frontend.errors import InvalidRequestError, SchedulerUnavailable
from plait.runtime.frontend.front_end import FrontEnd
from plait.runtime.frontend.tracker import RequestGroup
from plait.runtime.frontend.transport import InProcessTransport

STARTUP_TIMEOUT_S = 60.0


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
        self.transport = InProcessTransport(
            lambda: ModelRunner(self.config.model, self.config.memory, source=source), self.config)
        self.runner = self.transport.runner
        self.tokenizer = self.runner.tokenizer
        self.scheduler = self.transport.driver.scheduler
        self.front = FrontEnd(self.transport)
        # An engine still open when the interpreter exits stops its scheduler thread first: left to the
        # interpreter's teardown, a thread inside the native kernels could be cut off mid-step and the
        # process abort ("terminate called without an active exception").
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        self.front.start()
        self.front.ready_event.wait(STARTUP_TIMEOUT_S)
        self.front.check_available()

    # ---- generation ---------------------------------------------------------------------------
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
        workflow_id: str | list[str] | None = None,
        agent: str | list[str] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (a dict back) or a batch (a list). With `stream=True`, an iterator
        of cumulative snapshots of one request (`text` so far, `meta_info` current)."""
        group, is_batch = self._submit(_input(
            text=prompt, input_ids=input_ids, sampling_params=sampling_params, rid=rid,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            token_ids_logprob=token_ids_logprob, return_text_in_logprobs=return_text_in_logprobs, stream=stream,
            workflow_id=workflow_id, agent=agent))
        if stream:
            return self._stream(group)
        try:
            group.sync_wait()
        finally:
            self.front.finish(group)
        return _results(group, is_batch)

    def _submit(self, data: dict[str, Any]) -> tuple[RequestGroup, bool]:
        states, is_batch = self.front.prepare(data)
        if data.get("stream") and is_batch:
            raise InvalidRequestError("streaming takes one prompt with n = 1")
        return self.front.submit(states), is_batch

    def _stream(self, group: RequestGroup) -> Iterator[dict]:
        state = group.states[0]
        try:
            for _ in group.sync_updates():
                if state.finished:
                    group.raise_errors()
                yield state.result()
        finally:
            self.front.finish(group)

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, stream: bool = False, **kw):
        """Async variant of `generate`: awaits the result, or with `stream=True` returns an async iterator."""
        data = _input(text=prompt, sampling_params=sampling_params, input_ids=input_ids, stream=stream, **kw)
        group, is_batch = self._submit(data)
        if stream:
            return self._async_stream(group)
        try:
            await group.wait()
        finally:
            self.front.finish(group)
        return _results(group, is_batch)

    async def _async_stream(self, group: RequestGroup) -> AsyncIterator[dict]:
        state = group.states[0]
        try:
            async for _ in group.updates():
                if state.finished:
                    group.raise_errors()
                yield state.result()
        finally:
            self.front.finish(group)

    # ---- control ------------------------------------------------------------------------------
    def abort_request(self, rid: str = "", abort_all: bool = False) -> list[str]:
        """Abort the request with exactly this rid (and the copies `n > 1` or a batch made of it), or
        every request with `abort_all` (or an empty rid); its KV is freed at once. Returns the rids
        aborted (empty for abort_all)."""
        if abort_all or rid == "":
            self.front.abort_all()
            return []
        return self.front.abort(rid)

    def publish_workflow(self, workflow_id: str, steps: list[dict[str, Any]], current_step: str | None = None) -> None:
        """Tell the cache an agent workflow's step graph: `steps` is a list of `{"id": ..., "agents":
        [...], "next": [step ids]}`. Requests name their workflow and agent (`workflow_id`, `agent`);
        with `radix_eviction_policy="workflow"` the cache evicts and prefetches by it."""
        self.front.publish_workflow(workflow_id, steps, current_step)

    def flush_cache(self) -> bool:
        """Drop the prefix cache and compiled grammars (only when idle); returns whether it was flushed."""
        return self.front.flush_cache().result(timeout=60)

    def get_server_info(self) -> dict[str, Any]:
        """The same dict as the HTTP server's `/get_server_info` (docs/serving.md describes it)."""
        return self.front.query_info().result(timeout=60)

    def shutdown(self) -> None:
        self.transport.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.transport.close(timeout=0)
        except Exception:
            pass


def _shutdown_at_exit(ref: "weakref.ref[Engine]") -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


def _input(**fields: Any) -> dict[str, Any]:
    """The `/generate` body these keyword arguments stand for (None: not given)."""
    return {k: v for k, v in fields.items() if v is not None}


def _results(group: RequestGroup, is_batch: bool) -> dict | list[dict]:
    if group.failure is not None:
        raise SchedulerUnavailable(group.failure)
    group.raise_errors()
    results = [s.result() for s in group.states]
    return results if is_batch else results[0]
