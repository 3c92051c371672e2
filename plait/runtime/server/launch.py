"""Start the server: the model's processes (`model_processes.py`: the scheduler, its tensor-parallel
ranks, the data-parallel replicas), then uvicorn serving the app in this process.

    python -m plait.launch_server --model-path PATH [--host 127.0.0.1] [--port 30000] ...
    plait serve --model-path PATH ...

Health endpoints answer 503 until the model is loaded and a warm-up generation went through;
then a "ready" line with the URL is printed. SIGTERM (or Ctrl-C) stops accepting connections,
gives in-flight requests --shutdown-timeout seconds, aborts the rest, stops the scheduler
process and exits 0. If the scheduler process dies, pending requests fail with a 5xx error and
the server exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

logger = logging.getLogger("plait.server")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from plait.runtime.server.config import add_server_args

    parser = argparse.ArgumentParser(prog=prog,
                                     description="Serve a model over SGLang's native API and the OpenAI API.")
    add_server_args(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = build_parser(prog)
    return serve_from_args(parser.parse_args(argv), parser)


def serve_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Serve with flags parsed by a parser that has `add_server_args` (this module's, or `plait serve`)."""
    from plait.runtime.config import RuntimeConfig
    from plait.runtime.server.config import configs_from_args

    try:
        options, config = configs_from_args(args)
        RuntimeConfig.from_options(**options)  # fail on bad values before anything starts
        if config.tp_size > 1 and options.get("enable_hierarchical_cache"):
            # The host tier would copy only rank 0's KV heads; the other ranks' shards would be lost.
            raise ValueError("--enable-hierarchical-cache does not work with --tp-size > 1 yet")
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return serve(options, config)


def serve(options: dict[str, Any], config: Any) -> int:
    """Run until SIGTERM/SIGINT (exit code 0) or the scheduler's death (1)."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    if config.node_rank > 0:  # no HTTP here: this node only runs its tensor-parallel ranks
        from plait.runtime.server.model_processes import serve_worker_node

        return serve_worker_node(options, config)
    try:
        sock = _bind(config.host, config.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, e)
        return 1
    port = sock.getsockname()[1]
    ipc_dir = tempfile.mkdtemp(prefix="plait-ipc-")
    try:
        return _run(options, config, sock, port, ipc_dir)
    finally:
        sock.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets whose proto says TCP, and accepted connections inherit the listener's. Without it a
    # response written in two pieces waits for the client's delayed ACK: ~40 ms on every request of
    # a keep-alive connection (the OpenAI SDK's, any pooled client's).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _run(options: dict[str, Any], config: Any, sock: socket.socket, port: int, ipc_dir: str) -> int:
    from plait.runtime.server.model_processes import start_model_processes

    # Idle OpenMP workers of the scheduler process would spin on the cores the HTTP process needs for
    # every token; sleeping instead made decoding 5-10x faster on a busy 2-core machine. But a worker
    # that sleeps at once at each of a step's ~150 barriers pays a wake-up each time (a batch-1 step
    # of the default model: 16.1 ms against 15.0 spinning), so it polls 10,000 times first
    # (GOMP_SPINCOUNT): long enough for a barrier, short next to the time between steps that the HTTP
    # process needs the core for. Explicit values in the environment win.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    # The model's processes first: their `import torch` and model load are the longest part of
    # start-up, and this process's own imports (FastAPI, uvicorn) run meanwhile on another core.
    transport, processes = start_model_processes(options, config, ipc_dir)
    import uvicorn

    from plait.runtime.frontend.front_end import FrontEnd
    from plait.runtime.server.app import ServerState, create_app
    from plait.runtime.server.metrics import ServerMetrics
    from plait.runtime.server.uvicorn_server import Server

    if _tokenizer_needs_transformers(options):
        # The tokenizer arrives pickled with the scheduler's ready message; importing transformers now,
        # while the model loads, keeps that import off the event loop.
        threading.Thread(target=importlib.import_module, args=("transformers",), daemon=True).start()
    logger.info("starting: %s", _changed_options(config, options) or "default options")

    exit_code = {"value": 0}
    server: Server | None = None

    def on_dead(message: str) -> None:
        exit_code["value"] = 1
        if server is not None:
            server.should_exit = True

    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{port}"
    logger.info("address: %s (health checks answer 503 until the model is loaded)", url)
    metrics = ServerMetrics(config.model_name(options.get("model_path")))
    server_args = {k: v for k, v in dataclasses.asdict(config).items() if k != "api_key"}
    front = FrontEnd(transport, server_args=server_args, observer=metrics, on_dead=on_dead)
    state = ServerState(front, config, options, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        front.start()
        announcer = asyncio.create_task(_announce_when_ready(state, url))
        try:
            yield
        finally:
            announcer.cancel()
            alive = front.dead is None and front.ready is not None
            front.dead = front.dead or "the server is shutting down"
            await transport.close(tell_scheduler=alive)

    app = create_app(state, lifespan=lifespan)
    uv_config = uvicorn.Config(app, log_config=None, log_level=config.log_level, access_log=config.log_requests,
                               timeout_graceful_shutdown=int(config.shutdown_timeout) + 5, timeout_keep_alive=5)
    if config.log_level != "debug":
        # uvicorn would announce "Application startup complete" before the model is loaded; our own
        # lines say what happens, and `_announce_when_ready` prints the ready line. (After uvicorn's
        # Config, which sets its loggers' levels.)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = Server(uv_config, on_exit_signal=lambda: _drain(state, server))
    try:
        server.run(sockets=[sock])
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    if exit_code["value"]:
        logger.error("exiting: %s", front.dead)
    return exit_code["value"]


def _tokenizer_needs_transformers(options: dict[str, Any]) -> bool:
    """Whether the tokenizer will be transformers' (any but a GGUF file's, which Plait reads with the
    `tokenizers` library alone once it has saved it; the default model is a GGUF file)."""
    path = options.get("tokenizer_path") or options.get("model_path") or "default"
    return not (path == "default" or str(path).endswith(".gguf"))


async def _announce_when_ready(state: Any, url: str) -> None:
    front = state.front
    while not front.ready_event.is_set():
        await asyncio.sleep(0.05)
    if front.dead is not None:
        return
    start = time.monotonic()
    if not await state.health_generate(timeout=max(state.config.health_check_timeout, 60.0)):
        if front.dead is None:
            front.fail("the warm-up generation failed")
        return
    state.serving = True
    logger.debug("warm-up generation took %.2f s", time.monotonic() - start)
    print(f"The server is ready at {url} (model {state.model_name})", flush=True)


def _drain(state: Any, server: Any) -> None:
    """On SIGTERM/SIGINT: in-flight requests get --shutdown-timeout seconds, then are aborted."""
    front = state.front
    loop = server.loop
    if loop is None:
        return

    async def drain() -> None:
        deadline = time.monotonic() + state.config.shutdown_timeout
        if front.num_in_flight:
            logger.info("shutting down: waiting for %d in-flight requests", front.num_in_flight)
        while front.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if front.num_in_flight:
            logger.warning("shutting down: aborting %d requests still running", front.num_in_flight)
            state.drain_abort_all()

    loop.call_soon_threadsafe(lambda: loop.create_task(drain()))


def _changed_options(config: Any, options: dict[str, Any]) -> str:
    """The flags that differ from their defaults, as they would be typed (the API key hidden)."""
    import dataclasses

    from plait.runtime.config import RuntimeConfig

    defaults = {f.name: f.default for cls in (type(config), *RuntimeConfig.sections().values())
                for f in dataclasses.fields(cls)}
    values = {**dataclasses.asdict(config), **options}
    changed = []
    for name, value in values.items():
        if name in defaults and value != defaults[name]:
            flag = "--" + name.replace("_", "-")
            changed.append(flag if value is True else f"{flag} {'***' if name == 'api_key' else value}")
    return " ".join(changed)



if __name__ == "__main__":
    sys.exit(main())
