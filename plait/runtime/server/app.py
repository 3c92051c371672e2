"""The FastAPI application: shared state, request bodies, auth, errors, the OpenAPI document.

Endpoints live in `native_api.py` (SGLang's) and `openai_api.py` (`/v1/*`). Both hand their input
to the runtime's front end (`plait.runtime.frontend`, the same one `plait.Engine` uses): parsing,
tokenizing and validating run off the event loop (`ServerState.run_cpu`), so a large body never
stalls other requests or health checks; then `submit` and `wait` or a stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from typing import Any, AsyncIterator, Callable, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from plait.runtime.frontend.errors import InvalidRequestError, RequestError, SchedulerUnavailable
from plait.runtime.frontend.front_end import FrontEnd, Prepared
from plait.runtime.frontend.inputs import parse_model
from plait.runtime.frontend.messages import STATUS_UNAVAILABLE, SchedulerReady
from plait.runtime.frontend.tracker import HEALTH_CHECK_PREFIX, RequestGroup, RequestState
from plait.runtime.server.config import ServerConfig
from plait.runtime.server.metrics import RequestTiming, ServerMetrics
from plait.runtime.server.protocol import ApiError

logger = logging.getLogger("plait.server")

T = TypeVar("T")

MAX_JSON_DEPTH = 64  # nesting of a request body; deeper is refused before anything recurses into it
INLINE_PARSE_BYTES = 64 << 10  # bodies up to this size are parsed on the event loop (cheaper than a hop)


class JSON(Response):
    """orjson: fast, and non-finite floats become null instead of invalid JSON."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def api_error(e: RequestError) -> ApiError:
    """The HTTP answer for an error of the front end (the Engine raises the same error)."""
    return ApiError(e.status, str(e), param=getattr(e, "param", None))


class ServerState:
    def __init__(self, front: FrontEnd, config: ServerConfig, runtime_options: dict[str, Any],
                 metrics: ServerMetrics):
        self.front = front
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
            return self.front.check_available()
        except SchedulerUnavailable as e:
            raise ApiError(503, str(e)) from None

    def check_ready(self) -> None:
        """Raise a 503 ApiError unless the scheduler is up."""
        _ = self.ready

    @property
    def is_healthy(self) -> bool:
        return self.serving and self.front.is_ready

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

    # ---- request work off the event loop ----------------------------------------------------------
    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy request work (JSON parsing, tokenization, chat templates, validation) on a
        worker thread: the tokenizers release the GIL, so the event loop keeps answering meanwhile."""
        self.metrics.num_preparing_reqs.inc()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.metrics.num_preparing_reqs.dec()

    def prepare(self, data: Any) -> Prepared:
        """The front end's `prepare` (parse, tokenize, expand, validate), errors as ApiErrors.
        Blocking: call through `run_cpu`."""
        try:
            prepared = self.front.prepare(data, stream_internally=True)
        except RequestError as e:
            raise api_error(e) from None
        if self.config.log_requests:
            for s in prepared.states:
                logger.info("request %s: %d prompt tokens, %s", s.rid, len(s.request.input_ids),
                            _changed_params(s.request.sampling_params))
        return prepared

    def submit(self, states: list[RequestState]) -> RequestGroup:
        for s in states:
            s.timing = RequestTiming()
        try:
            return self.front.submit(states)
        except RequestError as e:
            raise api_error(e) from None

    async def wait(self, request: Request, group: RequestGroup, *, until_started: bool = False) -> None:
        """Wait for every request of the group (or, `until_started`, for its first output); abort
        them if the client goes away first."""
        waiter = asyncio.ensure_future(group.wait_started() if until_started else group.wait())
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                waiter.result()
            else:
                raise ApiError(499, "the client closed the connection")
        except SchedulerUnavailable as e:
            self.finish(group)
            raise ApiError(500, f"the request failed: {e}") from None
        except BaseException:
            self.finish(group)
            raise
        finally:
            watcher.cancel()
            waiter.cancel()
        if not until_started:
            self.finish(group)

    async def start_stream(self, request: Request, group: RequestGroup) -> None:
        """Before a stream's headers go out: wait for its first output, so a request the scheduler
        refuses (a constraint the grammar engine cannot follow) is a 4xx, not a 200 stream."""
        await self.wait(request, group, until_started=True)
        error = next((s.error() for s in group.states if s.finished and s.error() is not None), None)
        if error is not None and 400 <= error.status < 500:
            self.finish(group)
            raise api_error(error)

    def finish(self, group: RequestGroup) -> None:
        """Abort what is unfinished (a client gone, an error) and log what finished. Once per group."""
        if group.closed:
            return
        self.front.finish(group)
        if self.config.log_requests:
            for s in group.states:
                if s.finished:
                    meta = s.meta
                    logger.info("finished %s: %d completion tokens, %d cached, %s, %.3f s", s.rid,
                                meta.get("completion_tokens", 0), meta.get("cached_tokens", 0),
                                meta.get("finish_reason"), meta.get("e2e_latency", 0.0))

    # ---- queries ------------------------------------------------------------------------------------
    async def query(self, future_fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        try:
            future = future_fn()
        except SchedulerUnavailable as e:
            raise ApiError(503, str(e)) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            self.front.forget_query(future)
            raise ApiError(503, f"the scheduler did not answer within {timeout:.0f} s") from None
        except SchedulerUnavailable as e:
            raise ApiError(503, str(e)) from None

    async def health_generate(self, timeout: float) -> bool:
        """One greedy token through the whole path; True as soon as any output arrives."""
        if not self.front.is_ready:
            return False
        rid = f"{HEALTH_CHECK_PREFIX}{time.time_ns()}"
        data = {"input_ids": [0], "rid": rid, "stream": True,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        try:
            states, _ = self.front.prepare(data)
            group = self.front.submit(states)
        except RequestError:
            return False
        state = states[0]
        try:
            await asyncio.wait_for(group.wait(), timeout)
            return state.finished and state.error() is None and (state.meta.get("finish_reason") or {}).get(
                "type") != "abort"
        except (asyncio.TimeoutError, SchedulerUnavailable):
            return False
        finally:
            self.front.finish(group)
            self.front.tracker.forget(state)

    def drain_abort_all(self) -> None:
        self.front.abort_all(message="the server is shutting down", status=STATUS_UNAVAILABLE)


def check_errors(states: list[RequestState]) -> None:
    """Fail the HTTP request if the scheduler refused or failed any of its requests."""
    for s in states:
        error = s.error() if s.finished else None
        if error is not None:
            raise api_error(error)


def request_error(state: RequestState) -> ApiError | None:
    """The error a finished request ended with, as an ApiError (None for success or a client abort)."""
    error = state.error() if state.finished else None
    return api_error(error) if error is not None else None


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
async def read_json(request: Request, state: ServerState | None = None) -> dict[str, Any]:
    """The body as a JSON object, or an ApiError that says what is wrong with it. Large bodies are
    parsed off the event loop (through `state.run_cpu`)."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(415, f"Content-Type must be application/json, got {ctype!r}")
    body = await request.body()
    if state is not None and len(body) > INLINE_PARSE_BYTES:
        return await state.run_cpu(parse_json_object, body)
    return parse_json_object(body)


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        data = orjson.loads(body)  # strict: UTF-8 only, no NaN/Infinity, no lone surrogates
    except orjson.JSONDecodeError as e:
        if "depth" in str(e) or "recursion" in str(e):
            raise ApiError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as u:
            raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {u.start})") from None
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(data).__name__}")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    return data


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (1 for a flat object)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in item if isinstance(v, (dict, list)))
    return depth


def parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return parse_model(model, data)
    except InvalidRequestError as e:
        raise api_error(e) from None


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, by their Content-Length or as they stream
    in (pure ASGI: the body is never read whole before the check)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (--max-request-body-bytes)"

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = JSON(ApiError(413, self._message()).body(), status_code=413)
        await response(scope, receive, send)


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
def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads `model` from its JSON body (handlers parse the body
    themselves, for their error messages; this puts the schema into /openapi.json)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def create_app(state: ServerState, *, lifespan: Any = None) -> FastAPI:
    from plait.runtime.server import native_api, openai_api

    app = FastAPI(title="Plait", version=_version(), lifespan=lifespan, default_response_class=JSON)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSON:
        return JSON(e.body(), status_code=e.status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSON:
        error = api_error(e)
        return JSON(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSON:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code)
        message = message or str(e.detail)
        # 405 carries `Allow` (RFC 9110); Starlette puts it in the exception's headers.
        return JSON(ApiError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSON:
        return JSON(ApiError(400, f"invalid request: {e.errors()[:3]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSON:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSON(ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    models = native_api.register(app, state) + openai_api.register(app, state)
    _install_openapi(app, models)
    if state.config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=state.config.api_key)
    app.add_middleware(BodySizeLimit, max_bytes=state.config.max_request_body_bytes)
    return app


def _install_openapi(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """/openapi.json with the request-body schemas of every endpoint that takes one."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    from plait import __version__

    return __version__
