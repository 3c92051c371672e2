"""The FastAPI application: shared state, request parsing and validation, auth, errors.

Endpoints live in `native_api.py` (SGLang's) and `openai_api.py` (`/v1/*`); both turn their
input into `GenerateInput` and go through `ServerState.prepare` (tokenize, expand, validate)
and `ServerState.submit` / `wait` (send to the scheduler, wait for or stream the outputs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from plait.runtime.server.config import ServerConfig
from plait.runtime.server.messages import SchedulerReady
from plait.runtime.server.metrics import ServerMetrics
from plait.runtime.server.protocol import MAX_BATCH, MAX_LOGPROBS, ApiError, validation_error
from plait.runtime.server.scheduler_client import RequestGroup, SchedulerClient, SchedulerUnavailable
from plait.runtime.tokenizer_manager import GenerateInput, InvalidRequestError, RequestState, normalize
from plait.sampling_params import SamplingParamsError

logger = logging.getLogger("plait.server")


class JSON(Response):
    """orjson: fast, and non-finite floats become null instead of invalid JSON."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class ServerState:
    def __init__(self, client: SchedulerClient, config: ServerConfig, runtime_options: dict[str, Any],
                 metrics: ServerMetrics):
        self.client = client
        self.config = config
        self.runtime_options = runtime_options
        self.metrics = metrics
        self.model_name = config.model_name(runtime_options.get("model_path"))
        self.started_at = time.time()
        self.serving = False  # set once a warm-up generation went through; health answers 503 before

    # ---- the model, once loaded -------------------------------------------------------------------
    @property
    def ready(self) -> SchedulerReady:
        try:
            self.client.check_available()
        except SchedulerUnavailable as e:
            raise ApiError(503, str(e)) from None
        assert self.client.ready is not None
        return self.client.ready

    def check_ready(self) -> None:
        """Raise a 503 ApiError unless the scheduler is up."""
        _ = self.ready

    @property
    def tokenizer(self) -> Any:
        tokenizer = self.ready.tokenizer
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids (input_ids) instead of text")
        return tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, self.runtime_options.get("model_path")):
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    # ---- input -> scheduler requests --------------------------------------------------------------
    def prepare(self, inp: GenerateInput) -> tuple[list[RequestState], bool]:
        """Tokenize, expand (batch, n), and validate everything the scheduler would refuse."""
        ready = self.ready
        if inp.text is not None and ready.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send input_ids instead of text")
        try:
            requests, is_batch = normalize(inp, ready.tokenizer, default_sampling=ready.default_sampling)
            if len(requests) > MAX_BATCH:
                raise InvalidRequestError(f"{len(requests)} sequences in one request; at most {MAX_BATCH}")
            for r in requests:
                self._validate(r, ready)
                # The scheduler streams every request to us, so latencies are measured as tokens arrive.
                # Not with min_new_tokens and stop strings: the scheduler trims such a stop only within
                # the last output, so streaming would leak the part of it sent before.
                r.stream = r.stream or not (r.sampling_params.min_new_tokens and r.sampling_params.stop)
        except (InvalidRequestError, SamplingParamsError) as e:
            raise ApiError(400, str(e)) from None
        states = [RequestState(r, ready.tokenizer) for r in requests]
        if self.config.log_requests:
            for s in states:
                logger.info("request %s: %d prompt tokens, %s", s.request.rid, len(s.request.input_ids),
                            _changed_params(s.request.sampling_params))
        return states, is_batch

    @staticmethod
    def _validate(r: Any, ready: SchedulerReady) -> None:
        prompt_len, context = len(r.input_ids), ready.context_length
        if prompt_len >= context:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens, which does not fit the model's context length of {context}"
                " tokens (at least one must be left to generate)")
        max_new = r.sampling_params.max_new_tokens
        if max_new is not None and prompt_len + max_new > context:
            raise InvalidRequestError(
                f"the prompt ({prompt_len} tokens) plus the requested completion ({max_new} tokens) is longer than"
                f" the model's context length of {context} tokens")
        if prompt_len + 1 > ready.max_total_tokens:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens, more than the KV cache holds ({ready.max_total_tokens})")
        bad = next((t for t in r.input_ids if not 0 <= t < ready.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"input_ids: token id {bad} is outside the vocabulary [0, {ready.vocab_size})")
        r.sampling_params.verify(vocab_size=ready.vocab_size)
        if r.top_logprobs_num > MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs_num must be <= {MAX_LOGPROBS}, got {r.top_logprobs_num}")
        for t in r.token_ids_logprob or []:
            if not 0 <= t < ready.vocab_size:
                raise InvalidRequestError(f"token_ids_logprob: token id {t} is outside the vocabulary")

    def submit(self, states: list[RequestState]) -> RequestGroup:
        try:
            return self.client.submit(states)
        except SchedulerUnavailable as e:
            raise ApiError(503, str(e)) from None
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None

    async def wait(self, request: Request, group: RequestGroup) -> None:
        """Wait for every request of the group; abort them if the client goes away first."""
        waiter = asyncio.ensure_future(group.wait())
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                waiter.result()
            else:
                raise ApiError(499, "the client closed the connection")
        except SchedulerUnavailable as e:
            raise ApiError(500, f"the request failed: {e}") from None
        finally:
            watcher.cancel()
            waiter.cancel()
            self.finish(group)

    def finish(self, group: RequestGroup) -> None:
        """Abort what is unfinished (a client gone, an error) and log what finished. Once per group."""
        if group.closed:
            return
        group.closed = True
        for s in group.states:
            if not s.finished:
                self.client.abort(s.request.rid)
            elif self.config.log_requests:
                meta = s.meta
                logger.info("finished %s: %d completion tokens, %d cached, %s, %.3f s", s.request.rid,
                            meta.get("completion_tokens", 0), meta.get("cached_tokens", 0),
                            meta.get("finish_reason"), meta.get("e2e_latency", 0.0))


def request_error(state: RequestState) -> ApiError | None:
    """The error of a request the scheduler refused (finish reason abort with a 4xx status, e.g. a
    grammar that does not compile); a client's abort (499) is not an error."""
    reason = state.meta.get("finish_reason") or {}
    status = int(reason.get("status_code") or 0)
    if reason.get("type") == "abort" and 400 <= status < 499:
        return ApiError(status, str(reason.get("message")))
    return None


def check_errors(states: list[RequestState]) -> None:
    """Fail the HTTP request if the scheduler refused any of its requests."""
    for s in states:
        error = request_error(s)
        if error is not None:
            raise error


def _changed_params(params: Any) -> dict[str, Any]:
    default = type(params)()
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if getattr(params, f.name) != getattr(default, f.name)}


class EventStream(StreamingResponse):
    """The SSE response of one request group. The client leaving aborts the group's requests at
    once, watched from the start rather than noticed at the next write (which for a request still
    queued or in a long prefill may be far off; Starlette listens for it only under ASGI < 2.4);
    whatever ends the response (done, an error, the client) finishes the group."""

    def __init__(self, chunks: AsyncIterator[bytes], state: ServerState, group: RequestGroup):
        super().__init__(chunks, media_type="text/event-stream")
        self.server_state = state
        self.group = group

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(lambda w: w.cancelled() or self.server_state.finish(self.group))
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            self.server_state.finish(self.group)


async def _disconnected(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# ---- request bodies -------------------------------------------------------------------------------
async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or an ApiError that says what is wrong with it."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(415, f"Content-Type must be application/json, got {ctype!r}")
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(data).__name__}")
    _check_unicode(data)
    return data


def _check_unicode(value: Any, path: str = "") -> None:
    """JSON may escape lone UTF-16 surrogates (\\ud800), which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = f" in {path}" if path else ""
            raise ApiError(400, f"invalid text{where}: a lone UTF-16 surrogate is not valid Unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, path)
            _check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{path}[{i}]")


def parse(model: type, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


# ---- auth -------------------------------------------------------------------------------------------
class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on everything but health checks and metrics (pure ASGI, so
    streaming responses and disconnect detection pass through untouched)."""

    OPEN_PATHS = ("/health", "/health_generate", "/metrics", "/ping")

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = "missing API key: send `Authorization: Bearer <key>`" if not given else "invalid API key"
        response = JSON(ApiError(401, message, code="invalid_api_key").body(), status_code=401)
        await response(scope, receive, send)


# ---- the app ----------------------------------------------------------------------------------------
def create_app(state: ServerState, *, lifespan: Any = None) -> FastAPI:
    from plait.runtime.server import native_api, openai_api

    app = FastAPI(title="Plait", version=_version(), lifespan=lifespan, default_response_class=JSON)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSON:
        return JSON(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSON:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code)
        message = message or str(e.detail)
        return JSON(ApiError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSON:
        return JSON(ApiError(400, f"invalid request: {e.errors()[:3]}").body(), status_code=400)

    native_api.register(app, state)
    openai_api.register(app, state)
    if state.config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=state.config.api_key)
    return app


def _version() -> str:
    from plait import __version__

    return __version__
