"""Kept-alive HTTP connections to one server, shared by every thread of a frontend backend.

A program's calls come from many threads (one per program state, one per fork branch), each making
a few requests. Opening a TCP connection per request (what `urllib.request.urlopen` does) costs a
handshake, a new connection in the server's event loop and, on a loaded machine, scheduler time for
both; a pool of idle connections that any thread takes and gives back avoids all three. Standard
library only (`http.client`).
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.parse
from typing import Iterator, NamedTuple

# A kept-alive connection the server has since closed fails on its next use with one of these; the
# request was not processed, so it is sent again on a fresh connection.
_STALE = (http.client.RemoteDisconnected, http.client.CannotSendRequest, ConnectionResetError, BrokenPipeError)


class Response(NamedTuple):
    status: int
    body: bytes


class ConnectionPool:
    """Idle connections to `base_url`'s host; at most `max_idle` are kept."""

    def __init__(self, base_url: str, *, timeout: float | None, ssl_context: ssl.SSLContext | None,
                 max_idle: int = 64):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{base_url!r}: the server's URL must start with http:// or https://")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "localhost", parts.port
        self.path_prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _new(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ssl_context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """(a connection, whether it was used before)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._new(), False

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _send(self, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        while True:
            conn, reused = self._take()
            try:
                conn.request(method, self.path_prefix + path, body=body, headers=headers)
                return conn, conn.getresponse()
            except _STALE:
                conn.close()
                if not reused:
                    raise
            except BaseException:
                conn.close()
                raise

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response:
        """Send, read the whole answer, and keep the connection for the next request."""
        conn, resp = self._send(method, path, body, headers)
        try:
            data = resp.read()
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return Response(resp.status, data)

    def stream(self, method: str, path: str, body: bytes | None,
               headers: dict[str, str]) -> tuple[int, Iterator[bytes]]:
        """(status, the answer's lines as they arrive). The connection goes back to the pool only
        once every line was read; a stream left early closes it."""
        conn, resp = self._send(method, path, body, headers)

        def lines() -> Iterator[bytes]:
            finished = False
            try:
                yield from resp
                resp.read()  # the end of the body (a chunked answer's last chunk); marks the answer done
                finished = True
            finally:
                if finished and not resp.will_close:
                    self._give_back(conn)
                else:
                    conn.close()

        return resp.status, lines()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
