"""The router's HTTP server: the generation endpoints of SGLang's native API and the OpenAI API,
relayed (streaming included) to the worker the policy picks; health, metrics and worker management.

    POST /generate, /v1/completions, /v1/chat/completions   routed by prompt
    GET  /v1/models                                         from any healthy worker
    POST /flush_cache                                       to every worker
    GET  /health, /health_generate                          200 while a worker is in the pool
    GET  /get_server_info                                   the router, and each worker's own info
    GET  /metrics                                           Prometheus: per-worker load, requests, hit rate
    GET  /workers; POST /add_worker?url=U, /remove_worker?url=U

A request that cannot reach its worker (connection refused) goes to another healthy worker, at
most `max_retries` times; once sent, it is never sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

# The flags live with the config, so that `plait --help` does not import FastAPI.
from plait.router.config import DESCRIPTION, add_router_args  # noqa: F401 (re-exported)
from plait.router.core import NoWorkerAvailable, Router, Worker
from plait.router.tree import token_key
from plait.router.upstream import NotStarted, open_request

logger = logging.getLogger("plait.router")

ROUTED_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")


def routing_key(body: Any) -> str:
    """The text the policy routes on: the prompt (the first of a batch), token ids as characters, or
    the chat messages' roles and contents."""
    if not isinstance(body, dict):
        return ""
    for name in ("text", "prompt"):
        value = body.get(name)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(t, int) for t in value):
            return token_key(value)
    ids = body.get("input_ids")
    if isinstance(ids, list) and ids:
        ids = ids[0] if isinstance(ids[0], list) else ids
        if all(isinstance(t, int) and 0 <= t < 0x110000 for t in ids):
            return token_key(ids)
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
                parts.append(f"{m.get('role')}:{text}\n")
        return "".join(parts)
    return ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "RouterError", "code": status}}, status_code=status)


def create_router_app(router: Router) -> FastAPI:
    config = router.config

    async def check(worker: Worker) -> None:
        try:
            up = await open_request(worker.url + "/health", timeout=config.health_check_timeout)
            await up.read()
            ok, why = up.status == 200, f"health check answered {up.status}"
        except (OSError, asyncio.TimeoutError) as e:
            ok, why = False, f"health check failed: {e or type(e).__name__}"
        if ok:
            router.record_success(worker)
        else:
            router.record_failure(worker, why)

    async def health_loop() -> None:
        while True:
            await asyncio.gather(*(check(w) for w in list(router.workers.values())))
            await asyncio.sleep(config.health_check_interval)

    async def prune_loop() -> None:
        while True:
            await asyncio.sleep(config.eviction_interval)
            router.policy.prune()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(health_loop()), asyncio.create_task(prune_loop())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    app = FastAPI(lifespan=lifespan)

    async def relay(request: Request, path: str) -> Response:
        body = await request.body()
        try:
            key = routing_key(orjson.loads(body)) if body else ""
        except orjson.JSONDecodeError:
            key = ""  # the worker answers the bad body itself
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        tried: set[str] = set()
        while True:
            try:
                worker, _ = router.select(key, exclude=frozenset(tried))
            except NoWorkerAvailable as e:
                return _error(503, str(e))
            try:
                up = await open_request(worker.url + path, method="POST", body=body, headers=headers,
                                        timeout=config.request_timeout)
            except NotStarted as e:
                router.finished(worker)
                router.record_failure(worker, str(e))
                tried.add(worker.url)
                if len(tried) > config.max_retries:
                    return _error(502, f"no worker could take the request: {e}")
                router.retried()
                continue
            except (OSError, asyncio.TimeoutError) as e:
                router.finished(worker)
                router.record_failure(worker, str(e) or type(e).__name__)
                return _error(502, f"worker {worker.url} failed: {e or type(e).__name__}")
            if up.status < 500:
                worker.failures = 0

            async def stream(up=up, worker=worker):
                try:
                    async for chunk in up.body():
                        yield chunk
                finally:
                    up.close()
                    router.finished(worker)

            return StreamingResponse(stream(), status_code=up.status,
                                     media_type=up.headers.get("content-type", "application/json"))

    def route_to(path: str):
        async def route(request: Request) -> Response:
            return await relay(request, path)
        return route

    for path in ROUTED_PATHS:
        app.add_api_route(path, route_to(path), methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        for worker in router.healthy:
            try:
                up = await open_request(worker.url + "/v1/models", timeout=config.health_check_timeout)
                return Response(await up.read(), status_code=up.status, media_type="application/json")
            except (OSError, asyncio.TimeoutError):
                continue
        return _error(503, "no healthy worker")

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200 if router.healthy else 503)

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        results = await asyncio.gather(*(_fetch(w.url + "/flush_cache", "POST") for w in router.healthy))
        ok = all(status == 200 for status, _ in results)
        return Response("flushed\n" if ok else "not flushed on every worker\n", status_code=200 if ok else 400)

    @app.get("/workers")
    async def workers() -> dict[str, Any]:
        return {"workers": [_worker_state(w) for w in router.workers.values()]}

    @app.post("/add_worker")
    async def add_worker(url: str) -> dict[str, Any]:
        if not url.startswith("http://"):
            return _error(400, f"worker URLs must start with http://, got {url!r}")
        worker = router.add_worker(url)
        await check(worker)
        return _worker_state(worker)

    @app.post("/remove_worker")
    async def remove_worker(url: str) -> Response:
        return Response(status_code=200 if router.remove_worker(url) else 404)

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        infos = await asyncio.gather(*(_worker_info(w) for w in router.workers.values()))
        return {
            "router": {"policy": router.policy.name, "retries_total": router.retries_total,
                       "num_workers": len(router.workers), "num_healthy": len(router.healthy)},
            "workers": [{**_worker_state(w), "server_info": info} for w, info in zip(router.workers.values(), infos)],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        infos = await asyncio.gather(*(_worker_info(w) for w in router.workers.values()))
        return Response(_prometheus(router, infos), media_type="text/plain; version=0.0.4")

    return app


async def _fetch(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        up = await open_request(url, method=method, body=b"{}" if method == "POST" else None, timeout=timeout)
        return up.status, await up.read()
    except (OSError, asyncio.TimeoutError):
        return 0, b""


async def _worker_info(worker: Worker) -> dict[str, Any] | None:
    if not worker.healthy:
        return None
    status, body = await _fetch(worker.url + "/get_server_info")
    try:
        return orjson.loads(body) if status == 200 else None
    except orjson.JSONDecodeError:
        return None


def cache_hit_rate(info: dict[str, Any] | None) -> float | None:
    """A worker's prefix-cache hit rate over all its schedulers (cached / prompt tokens)."""
    if not info:
        return None
    states = info.get("internal_states") or []
    prompt = sum(s.get("cache", {}).get("prompt_tokens_total", 0) for s in states)
    cached = sum(s.get("cache", {}).get("cached_tokens_total", 0) for s in states)
    return cached / prompt if prompt else 0.0


def _worker_state(w: Worker) -> dict[str, Any]:
    return {"url": w.url, "healthy": w.healthy, "in_flight": w.in_flight, "requests_total": w.requests_total,
            "failures_total": w.failures_total, "decisions": dict(w.decisions),
            "estimated_hit_rate": w.estimated_hit_rate}


def _prometheus(router: Router, infos: list[dict[str, Any] | None]) -> bytes:
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    registry = CollectorRegistry()
    label = ["worker"]
    gauges = {
        "healthy": Gauge("plait_router_worker_healthy", "1 while the worker is in the pool", label, registry=registry),
        "in_flight": Gauge("plait_router_worker_in_flight", "requests sent and not finished", label, registry=registry),
        "estimated": Gauge("plait_router_worker_estimated_hit_rate",
                           "share of the routed prompts the router's tree says the worker had seen", label,
                           registry=registry),
        "hit_rate": Gauge("plait_router_worker_cache_hit_rate", "the worker's own prefix-cache hit rate", label,
                          registry=registry),
    }
    requests = Counter("plait_router_worker_requests", "requests routed to the worker", label, registry=registry)
    failures = Counter("plait_router_worker_failures", "failed health checks and requests", label, registry=registry)
    retries = Counter("plait_router_retries", "requests sent to another worker after a failure", registry=registry)
    retries.inc(router.retries_total)
    for w, info in zip(router.workers.values(), infos):
        gauges["healthy"].labels(w.url).set(1 if w.healthy else 0)
        gauges["in_flight"].labels(w.url).set(w.in_flight)
        gauges["estimated"].labels(w.url).set(w.estimated_hit_rate)
        rate = cache_hit_rate(info)
        if rate is not None:
            gauges["hit_rate"].labels(w.url).set(rate)
        requests.labels(w.url).inc(w.requests_total)
        failures.labels(w.url).inc(w.failures_total)
    return generate_latest(registry)


def router_from_args(args: Any, parser: Any) -> int:
    """Run the router with flags parsed by a parser that has `add_router_args`, until Ctrl-C or SIGTERM."""
    import dataclasses

    import uvicorn

    from plait.router.config import RouterConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RouterConfig)}
    values["worker_urls"] = tuple(values["worker_urls"])
    try:
        config = RouterConfig(**values)
    except ValueError as e:
        parser.error(str(e))
    if not config.worker_urls:
        parser.error("give at least one --worker-urls URL (more can join through POST /add_worker)")
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router = Router(config)
    logger.info("routing to %s with %s on http://%s:%d", ", ".join(config.worker_urls), config.policy,
                config.host, config.port)
    uvicorn.run(create_router_app(router), host=config.host, port=config.port, log_level=config.log_level,
                access_log=False, log_config=None)
    return 0


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_router_args(parser)
    return router_from_args(parser.parse_args(argv), parser)

