"""SGLang's native endpoints: /generate, health, model and server info, cache flush, abort,
tokenize/detokenize, metrics."""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response

from plait.runtime.frontend.errors import InvalidRequestError, SchedulerUnavailable
from plait.runtime.frontend.inputs import GenerateReqInput
from plait.runtime.frontend.tracker import RequestGroup, RequestState
from plait.runtime.server.app import (
    JSON,
    SSE_DONE,
    EventStream,
    ServerState,
    body_schema,
    check_errors,
    parse,
    read_json,
    request_error,
    sse,
)
from plait.runtime.server.metrics import CONTENT_TYPE
from plait.runtime.server.protocol import (
    AbortRequestBody,
    ApiError,
    DetokenizeRequest,
    TokenizeRequest,
    WorkflowBody,
)


def register(app: FastAPI, state: ServerState) -> list[type[BaseModel]]:
    """Add the routes; returns the request-body models they read (for /openapi.json)."""

    @app.api_route("/generate", methods=["POST", "PUT"], openapi_extra=body_schema(GenerateReqInput))
    async def generate(request: Request) -> Response:
        data = await read_json(request, state)
        states, is_batch = await state.run_cpu(state.prepare, data)
        group = state.submit(states)
        if data.get("stream") is True:
            await state.start_stream(request, group)
            return EventStream(_stream(state, group, is_batch), state, group)
        await state.wait(request, group)
        check_errors(states)
        results = [s.result() for s in states]
        return JSON(results if is_batch else results[0])

    @app.get("/health")
    async def health() -> Response:
        if not state.is_healthy:
            return _unavailable(state)
        return JSON({"status": "ok"})

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if not state.is_healthy:
            return _unavailable(state)
        if await state.health_generate(state.config.health_check_timeout):
            return JSON({"status": "ok"})
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
            "context_length": ready.limits.context_length,
            # The frontend's RuntimeEndpoint builds its role template from this.
            "chat_template": ready.tokenizer.chat_template if ready.tokenizer is not None else None,
        })

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> Response:
        return JSON(await state.query(state.front.query_info))

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if not await state.query(state.front.flush_cache):
            return PlainTextResponse("Cache not flushed: requests are running or waiting.", status_code=400)
        return PlainTextResponse("Cache flushed.")

    @app.post("/abort_request", openapi_extra=body_schema(AbortRequestBody))
    async def abort_request(request: Request) -> Response:
        body = parse(AbortRequestBody, await read_json(request))
        if not body.rid and not body.abort_all:
            raise ApiError(400, "give the rid of the request to abort, or abort_all: true", param="rid")
        state.check_ready()
        if body.abort_all:
            state.front.abort_all()
            return JSON({"aborted": "all"})
        # Exactly this rid, and the copies n > 1 or a batch made of it; never another request whose
        # rid merely starts with it.
        return JSON({"aborted": state.front.abort(body.rid)})

    @app.post("/workflow", openapi_extra=body_schema(WorkflowBody))
    async def publish_workflow(request: Request) -> Response:
        body = parse(WorkflowBody, await read_json(request))
        state.check_ready()
        try:
            state.front.publish_workflow(body.workflow_id, [s.model_dump() for s in body.steps], body.current_step)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        return JSON({"workflow_id": body.workflow_id, "steps": len(body.steps)})

    @app.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    @app.post("/v1/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        data = await read_json(request, state)
        return JSON(await state.run_cpu(_tokenize, state, data))

    @app.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    @app.post("/v1/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        data = await read_json(request, state)
        return JSON(await state.run_cpu(_detokenize, state, data))

    if state.config.enable_metrics:
        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    return [GenerateReqInput, AbortRequestBody, TokenizeRequest, DetokenizeRequest, WorkflowBody]


def _tokenize(state: ServerState, data: dict[str, Any]) -> dict[str, Any]:
    try:
        body = parse(TokenizeRequest, data)
    except ApiError as e:
        raise ApiError(400, f"tokenize takes {{\"prompt\": <string or list of strings>}}: {e.message}",
                       param=e.param) from None
    text = body.prompt if body.prompt is not None else body.text
    if text is None:
        raise ApiError(400, "tokenize takes {\"prompt\": <string or list of strings>}", param="prompt")
    state.check_model(body.model)
    tok = state.tokenizer
    context = state.ready.limits.context_length
    if isinstance(text, list):
        tokens = [tok.encode(t, add_special_tokens=body.add_special_tokens) for t in text]
        return {"tokens": tokens, "count": [len(t) for t in tokens], "max_model_len": context}
    tokens = tok.encode(text, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": context}


def _detokenize(state: ServerState, data: dict[str, Any]) -> dict[str, Any]:
    try:
        body = parse(DetokenizeRequest, data)
    except ApiError as e:
        raise ApiError(400, f"detokenize takes {{\"tokens\": <list of token ids>}}: {e.message}",
                       param="tokens") from None
    state.check_model(body.model)
    vocab = state.ready.limits.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"text": state.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)}


def _unavailable(state: ServerState) -> Response:
    reason = state.front.dead or "the server is starting: the model is loading"
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
