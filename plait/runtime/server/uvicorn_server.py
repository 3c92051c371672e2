"""The server's uvicorn `Server`, in a module of its own: importing uvicorn costs a tenth of a second
that the scheduler process, which re-imports the launch module, has no use for."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from typing import Any, Callable, Iterator

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's Server with two changes: a first SIGTERM/SIGINT also starts the drain of in-flight
    requests, and the signal is not re-raised after shutdown (uvicorn does that, which would make a
    cleanly stopped server die by the signal instead of exiting 0)."""

    def __init__(self, config: uvicorn.Config, *, on_exit_signal: Callable[[], None]):
        super().__init__(config)
        self.on_exit_signal = on_exit_signal
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            self.on_exit_signal()

