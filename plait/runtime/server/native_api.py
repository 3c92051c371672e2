"""SGLang's native endpoints: /generate, health, model and server info, cache flush, abort,
tokenize/detokenize, metrics."""

from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from starlette.responses import PlainTextResponse, Response

from plait.runtime.server.app import (
    JSON,
    SSE_DONE,
    EventStream,
    ServerState,
    check_errors,
    parse,
    read_json,
    request_error,
    sse,
)
from plait.runtime.server.metrics import CONTENT_TYPE
from plait.runtime.server.protocol import ApiError, GenerateRequestBody
from plait.runtime.server.scheduler_client import RequestGroup, SchedulerUnavailable
from plait.runtime.tokenizer_manager import GenerateInput, RequestState

_INPUT_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateInput))


def register(app: FastAPI, state: ServerState) -> None:
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        body = parse(GenerateRequestBody, await read_json(request))
        unsupported = body.unsupported_field()
        if unsupported:
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
        values = {name: getattr(body, name) for name in _INPUT_FIELDS}
        for flag in ("return_logprob", "return_text_in_logprobs", "stream"):
            values[flag] = values[flag] or False
        inp = GenerateInput(**values)
        states, is_batch = state.prepare(inp)
        group = state.submit(states)
        if inp.stream:
            return EventStream(_stream(state, group, is_batch), state, group)
        await state.wait(request, group)
        check_errors(states)
        results = [s.result() for s in states]
        return JSON(results if is_batch else results[0])

    @app.get("/health")
    async def health() -> Response:
        if not (state.serving and state.client.is_ready):
            return _unavailable(state)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if not (state.serving and state.client.is_ready):
            return _unavailable(state)
        if await state.client.health_generate(state.config.health_check_timeout):
            return Response(status_code=200)
        return JSON(ApiError(503, "the health-check generation did not complete").body(), status_code=503)

    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        ready = state.ready
        return JSON({
            "model_path": ready.model_path,
            "tokenizer_path": ready.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "served_model_name": state.model_name,
            "context_length": ready.context_length,
            # The frontend's RuntimeEndpoint builds its role template from this.
            "chat_template": ready.tokenizer.chat_template if ready.tokenizer is not None else None,
        })

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> Response:
        ready = state.ready
        try:
            scheduler = await state.client.query_info()
        except SchedulerUnavailable as e:
            raise ApiError(503, str(e)) from None
        from plait import __version__

        return JSON({
            **{k: v for k, v in dataclasses.asdict(state.config).items() if k != "api_key"},
            **state.runtime_options,
            "served_model_name": state.model_name,
            "model_path": ready.model_path,
            "context_length": ready.context_length,
            "max_total_num_tokens": ready.max_total_tokens,
            "max_running_requests": ready.max_running_requests,
            "max_req_input_len": ready.context_length - 1,
            "vocab_size": ready.vocab_size,
            **ready.info,
            "internal_states": [scheduler],
            "version": __version__,
        })

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        state.check_ready()
        try:
            flushed = await state.client.flush_cache()
        except SchedulerUnavailable as e:
            raise ApiError(503, str(e)) from None
        if not flushed:
            return PlainTextResponse("Cache not flushed: requests are running or waiting.", status_code=400)
        return PlainTextResponse("Cache flushed.")

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        data = await read_json(request)
        rid, abort_all = data.get("rid", ""), data.get("abort_all", False)
        if not isinstance(rid, str) or not isinstance(abort_all, bool):
            raise ApiError(400, "abort_request takes {\"rid\": <string>, \"abort_all\": <bool>}")
        if not rid and not abort_all:
            raise ApiError(400, "give the rid of the request to abort, or abort_all: true")
        state.check_ready()
        if abort_all:
            state.client.abort("")
            return JSON({"aborted": "all"})
        # The rids of n > 1 and batch requests are `<rid>_<i>`: the base rid aborts them all.
        rids = [r for r in state.client.rids() if r == rid or r.startswith(rid + "_")]
        for r in rids:
            state.client.abort(r)
        return JSON({"aborted": rids})

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> Response:
        data = await read_json(request)
        text, add_special = data.get("prompt", data.get("text")), data.get("add_special_tokens", True)
        if not isinstance(text, (str, list)) or (isinstance(text, list) and not all(isinstance(t, str) for t in text)):
            raise ApiError(400, "tokenize takes {\"prompt\": <string or list of strings>}", param="prompt")
        if not isinstance(add_special, bool):
            raise ApiError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
        tok = state.tokenizer
        if isinstance(text, list):
            tokens = [tok.encode(t, add_special_tokens=add_special) for t in text]
            return JSON({"tokens": tokens, "count": [len(t) for t in tokens],
                         "max_model_len": state.ready.context_length})
        tokens = tok.encode(text, add_special_tokens=add_special)
        return JSON({"tokens": tokens, "count": len(tokens), "max_model_len": state.ready.context_length})

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request) -> Response:
        data = await read_json(request)
        tokens = data.get("tokens")
        skip = data.get("skip_special_tokens", False)
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ApiError(400, "detokenize takes {\"tokens\": <list of token ids>}", param="tokens")
        vocab = state.ready.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return JSON({"text": state.tokenizer.decode(tokens, skip_special_tokens=bool(skip))})

    if state.config.enable_metrics:
        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)


def _unavailable(state: ServerState) -> Response:
    reason = state.client.dead or "the server is starting: the model is loading"
    return JSON(ApiError(503, reason).body(), status_code=503)


async def _stream(state: ServerState, group: RequestGroup, is_batch: bool) -> AsyncIterator[bytes]:
    """Cumulative snapshots, as SGLang streams them; batch items carry their `index`."""
    try:
        async for changed in group.updates():
            for i in changed:
                out = _snapshot(group.states[i])
                if is_batch:
                    out["index"] = i
                yield sse(out)
        yield SSE_DONE
    except SchedulerUnavailable as e:
        yield sse(ApiError(500, f"the request failed: {e}").body())
        yield SSE_DONE
    finally:
        state.finish(group)


def _snapshot(s: RequestState) -> dict[str, Any]:
    out = s.result()
    error = request_error(s) if s.finished else None
    if error is not None:
        out.update(error.body())
    return out
