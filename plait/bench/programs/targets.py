"""The systems under test, built from the command line: Plait in-process (`engine`), Plait (or
SGLang) over its native protocol (`endpoint`), and any OpenAI-compatible server through the
frontend's OpenAI backend (`openai`: vLLM, llama.cpp's llama-server, Plait's own `/v1`).

Every target sends the same text: prompts are rendered by one named chat template on the client,
and the OpenAI backend runs in completion mode (`/v1/completions`), so roles reach every server as
the same string.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from plait.bench.programs.gbnf import regex_to_gbnf
from plait.bench.programs.measure import Meter, openai_meter, plait_meter
from plait.lang.backend.base import BaseBackend
from plait.lang.backend.openai import OpenAI
from plait.lang.params import GenParams

SERVERS = ("plait", "sglang", "vllm", "llama.cpp", "other")


@dataclass
class Target:
    label: str  # names the system in tables and plots
    kind: str  # engine | endpoint | openai
    server: str  # one of SERVERS
    backend: BaseBackend
    meter: Meter
    flush: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)  # goes into every record
    close: Callable[[], None] = lambda: None


class PeerOpenAI(OpenAI):
    """The frontend's OpenAI backend in completion mode, with `regex` spelled the way the server
    reads it: vLLM's `structured_outputs`, llama-server's GBNF `grammar`, SGLang's and Plait's `regex`."""

    def __init__(self, model_name: str, *, server: str, **kwargs: Any):
        super().__init__(model_name, is_chat_model=False, sglang_extensions=True, **kwargs)
        self.server = server

    def _sampling_kwargs(self, params: GenParams, s: Any = None) -> dict[str, Any]:
        kw = super()._sampling_kwargs(params, s)
        extra = kw.get("extra_body") or {}
        regex = extra.pop("regex", None)
        if regex is not None:
            if self.server == "vllm":
                extra["structured_outputs"] = {"regex": regex}
            elif self.server == "llama.cpp":
                extra["grammar"] = regex_to_gbnf(regex)
            else:
                extra["regex"] = regex
        return kw


def engine_target(options: dict[str, Any], *, chat_template: str | None, label: str | None) -> Target:
    from plait.lang.backend.engine_backend import EngineBackend
    from plait.runtime.engine import Engine

    engine = Engine(**options)
    backend = EngineBackend(engine, chat_template_name=chat_template)
    info = engine.get_server_info()
    return Target(
        label=label or "plait", kind="engine", server="plait", backend=backend, meter=plait_meter(engine.get_server_info),
        flush=lambda: _retry_flush(engine.flush_cache), close=engine.shutdown,
        info={"engine_options": options, "model_path": info.get("model_path"), "dtype": info.get("dtype")},
    )


def endpoint_target(url: str, *, api_key: str | None, chat_template: str | None, label: str | None) -> Target:
    from plait.lang.backend.runtime_endpoint import RuntimeEndpoint

    backend = RuntimeEndpoint(url, api_key=api_key, chat_template_name=chat_template)
    server = "plait" if _is_plait(url, api_key) else "sglang"
    return Target(
        label=label or f"{server}-endpoint", kind="endpoint", server=server, backend=backend,
        meter=plait_meter(backend.get_server_info) if server == "plait" else dict,
        flush=lambda: _retry_flush(backend.flush_cache),
        info={"url": url, "model_path": backend.get_model_name()},
    )


def openai_target(url: str, *, model: str | None, api_key: str | None, server: str, chat_template: str | None,
                  label: str | None) -> Target:
    url = url.rstrip("/").removesuffix("/v1")
    listed = _get_json(url + "/v1/models", api_key)["data"]
    if server == "auto":
        owner = str(listed[0].get("owned_by", ""))
        server = {"vllm": "vllm", "llamacpp": "llama.cpp", "plait": "plait", "sglang": "sglang"}.get(owner, "other")
    backend = PeerOpenAI(model or listed[0]["id"], server=server, chat_template=chat_template or "chatml",
                         base_url=url + "/v1", api_key=api_key or "none", max_retries=1)

    def flush() -> None:
        # Every run's text comes from its own seed, so nothing is shared with an earlier run; a flush
        # where the server has one only starts each run from an equally empty cache.
        path = {"plait": "/flush_cache", "sglang": "/flush_cache", "vllm": "/reset_prefix_cache"}.get(server)
        if path:
            _retry_flush(lambda: _post(url + path, api_key))

    return Target(
        label=label or (server if server != "plait" else "plait-openai"), kind="openai", server=server,
        backend=backend, meter=openai_meter(backend, url + "/metrics" if server == "vllm" else None), flush=flush,
        info={"url": url, "model": backend.model_name},
    )


def _retry_flush(flush: Callable[[], Any], attempts: int = 100) -> None:
    """A cache flush is refused while requests run (a previous run's stragglers): retry briefly."""
    for _ in range(attempts):
        if flush() is not False:
            return
        time.sleep(0.1)


def _is_plait(url: str, api_key: str | None) -> bool:
    try:
        return any(m.get("owned_by") == "plait" for m in _get_json(url.rstrip("/") + "/v1/models", api_key)["data"])
    except (OSError, ValueError, KeyError):
        return False


def _request(url: str, api_key: str | None, data: bytes | None = None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")


def _get_json(url: str, api_key: str | None) -> Any:
    with urllib.request.urlopen(_request(url, api_key), timeout=60) as resp:
        return json.loads(resp.read())


def _post(url: str, api_key: str | None) -> bool:
    try:
        urllib.request.urlopen(_request(url, api_key, b"{}"), timeout=60).close()
        return True
    except urllib.error.HTTPError as e:
        return e.code != 400  # 400: busy (retry); anything else: the server has no such flush
    except OSError:
        return True
