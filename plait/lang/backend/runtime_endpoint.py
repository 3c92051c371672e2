"""`RuntimeEndpoint`: the frontend over HTTP to a running Plait (or SGLang) server.

Speaks the native protocol: `POST /generate` (JSON; `"stream": true` answers server-sent events
`data: {...}` ending with `data: [DONE]`), `GET /get_model_info`, `POST /flush_cache`,
`GET /get_server_info`. Uses only the standard library; requests go over kept-alive connections
shared by the program threads (`http_connections.py`).
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Iterator

from plait.lang.backend.http_connections import ConnectionPool
from plait.lang.backend.srt import GenerateProtocolBackend
from plait.lang.chat_template import (
    chat_template_from_jinja,
    get_chat_template,
    get_chat_template_by_model_path,
    jinja_renderer,
)


class HTTPStatusError(RuntimeError):
    """The server answered with an error status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RuntimeEndpoint(GenerateProtocolBackend):
    def __init__(self, base_url: str, api_key: str | None = None, verify: Any = None,
                 chat_template_name: str | None = None, *, timeout: float | None = None,
                 incremental_streaming_output: bool | None = None):
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.incremental_streaming_output = incremental_streaming_output
        self._ssl = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else None
        if verify is False:
            self._ssl = ssl._create_unverified_context()
        self._pool = ConnectionPool(self.base_url, timeout=timeout, ssl_context=self._ssl)
        self.has_tokenize = True  # until the server says otherwise (SGLang servers may lack /tokenize)
        self.model_info = self._json("GET", "/get_model_info")
        self.chat_template = self._choose_chat_template(chat_template_name)

    def _choose_chat_template(self, name: str | None) -> Any:
        if name:
            return get_chat_template(name)
        jinja = self.model_info.get("chat_template")
        if isinstance(jinja, str) and jinja:
            try:
                derived = chat_template_from_jinja(jinja_renderer(jinja), name=f"derived:{self.get_model_name()}")
            except Exception:  # a template jinja2 cannot compile: fall back to the path rules
                derived = None
            if derived is not None:
                return derived
        return get_chat_template_by_model_path(self.model_info.get("model_path"))

    # ---- transport ----------------------------------------------------------------------------
    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json"} if has_body else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        resp = self._pool.request(method, path, data, self._headers(data is not None))
        if resp.status >= 400:
            detail = resp.body.decode(errors="replace")
            raise HTTPStatusError(f"{method} {path} failed with HTTP {resp.status}: {detail}", resp.status)
        return resp.body

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        raw = self._request(method, path, body)
        return json.loads(raw) if raw.strip() else None

    def _generate(self, body: dict[str, Any]) -> Any:
        return self._json("POST", "/generate", body)

    def _generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        status, lines = self._pool.stream("POST", "/generate", json.dumps(body).encode(), self._headers(True))
        if status >= 400:
            detail = b"".join(lines).decode(errors="replace")
            raise HTTPStatusError(f"POST /generate failed with HTTP {status}: {detail}", status)
        done = False
        for raw in lines:
            line = raw.decode("utf-8").strip()
            if done or not line.startswith("data:"):
                continue  # after [DONE]: read to the end, so the connection can serve the next request
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if isinstance(event, dict) and "error" in event:
                raise RuntimeError(f"generation failed: {event['error']}")
            yield event

    def prompt_len(self, s: Any) -> int:
        """Counted by `/tokenize` in the HTTP process, without waiting for a scheduler step."""
        if s.images_ or not self.has_tokenize:
            return super().prompt_len(s)
        try:
            res = self._json("POST", "/tokenize", {"prompt": s.text_})
            count = res.get("count") if isinstance(res, dict) else None
        except HTTPStatusError as e:
            if e.status not in (404, 405):
                raise
            count = None
        if not isinstance(count, int):
            self.has_tokenize = False
            return super().prompt_len(s)
        return count

    # ---- administration -----------------------------------------------------------------------
    def get_model_name(self) -> str:
        return str(self.model_info.get("model_path"))

    def flush_cache(self) -> bool:
        """Whether the server flushed its prefix cache (it refuses while requests are running)."""
        try:
            self._request("POST", "/flush_cache")
        except HTTPStatusError:
            return False
        return True

    def get_server_info(self) -> Any:
        return self._json("GET", "/get_server_info")

    def start_profile(self) -> None:
        self._request("POST", "/start_profile")

    def stop_profile(self) -> None:
        self._request("POST", "/stop_profile")

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        self._json("POST", "/concate_and_append_request", {"src_rids": src_rids, "dst_rid": dst_rid})


def __getattr__(name: str) -> Any:
    # SGLang users import Runtime from this module; it lives in runtime.py.
    if name == "Runtime":
        from plait.lang.backend.runtime import Runtime

        return Runtime
    raise AttributeError(name)
