"""A minimal asyncio HTTP/1.1 client for the router: send one request to a worker, read its status
and headers, then relay the body as it arrives (chunked or not) without buffering it."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import AsyncIterator


class NotStarted(OSError):
    """The worker could not be reached: nothing was sent, so the request may go elsewhere."""


class Upstream:
    """An open response from a worker; `close()` drops the connection (the worker then sees the
    client gone and aborts the request)."""

    def __init__(self, status: int, headers: dict[str, str], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.status, self.headers, self._reader, self._writer = status, headers, reader, writer

    async def body(self) -> AsyncIterator[bytes]:
        reader, headers = self._reader, self.headers
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    return
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length:
                yield await reader.readexactly(length)
        else:
            while chunk := await reader.read(65536):
                yield chunk

    async def read(self) -> bytes:
        try:
            return b"".join([chunk async for chunk in self.body()])
        finally:
            self.close()

    def close(self) -> None:
        self._writer.close()


async def open_request(url: str, *, method: str = "GET", body: bytes | None = None,
                       headers: dict[str, str] | None = None, timeout: float | None = None) -> Upstream:
    """Connect, send, and read the status line and headers. Raises `NotStarted` when the worker cannot
    be reached (nothing was sent), OSError when the connection breaks after the request was sent, and
    asyncio.TimeoutError when no answer starts within `timeout`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", "Accept: */*"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]

    async def start() -> Upstream:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            raise NotStarted(f"cannot connect to {host}:{port}: {e}") from e
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("the worker closed the connection without answering")
            status = int(status_line.split()[1])
            response_headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                response_headers[name.strip().lower()] = value.strip()
        except BaseException:
            writer.close()
            raise
        return Upstream(status, response_headers, reader, writer)

    return await asyncio.wait_for(start(), timeout)
