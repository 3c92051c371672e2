"""The HTTP server's transport: ZMQ sockets to the scheduler process, and a watch on its life.

Requests go out on a PUSH socket with non-blocking sends (an unbounded high-water mark: the
scheduler drains it), so an abort can be sent from the `finally` of a cancelled task. One asyncio
task reads the PULL socket and delivers each message on the event loop. A watchdog polls the
process and the processes of its other tensor-parallel ranks: if one exits, a `SchedulerFailed`
naming it is delivered like any message from the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from plait.runtime.frontend.errors import SchedulerUnavailable
from plait.runtime.frontend.messages import SchedulerFailed, Shutdown, ToScheduler
from plait.runtime.frontend.transport import Deliver, Transport

logger = logging.getLogger(__name__)


class ZmqTransport(Transport):
    def __init__(self, requests_address: str, outputs_address: str, *, process: Any = None,
                 workers: list[Any] | None = None):
        """Binds both sockets; `process` (the scheduler's multiprocessing.Process) and `workers` (the
        processes of its other tensor-parallel ranks, rank 1 first) are watched for death."""
        self._sync_context = zmq.Context()
        self._push = self._sync_context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never block the event loop; the scheduler drains it
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(requests_address)
        self._async_context = zmq.asyncio.Context()
        self._pull = self._async_context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(outputs_address)
        self.process = process
        self.workers = list(workers or [])
        self._deliver: Deliver | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    def start(self, deliver: Deliver) -> None:
        """Call on the event loop that will deliver."""
        self._deliver = deliver
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._watchdog())]

    def send(self, msg: ToScheduler) -> None:
        if self._closed:
            raise SchedulerUnavailable("the server is shutting down")
        try:
            self._push.send_pyobj(msg, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise SchedulerUnavailable(f"cannot reach the scheduler process: {e}") from e

    async def close(self, *, tell_scheduler: bool, timeout: float = 5.0) -> None:
        """Ask the scheduler process to abort everything and exit; wait for it (then force it)."""
        for task in self._tasks:  # its exit is expected now: the watchdog must not call it a failure
            task.cancel()
        if tell_scheduler:
            try:
                self.send(Shutdown())
            except SchedulerUnavailable:
                pass
        self._closed = True
        deadline = time.monotonic() + timeout
        for proc in [p for p in (self.process, *self.workers) if p is not None]:
            while proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.is_alive():
                logger.warning("%s did not exit in %.0f s; terminating it", proc.name, timeout)
                proc.terminate()
                proc.join(2)
        self._pull.close()
        self._push.close()
        self._sync_context.term()
        self._async_context.term()

    async def _read_loop(self) -> None:
        assert self._deliver is not None
        while True:
            msg = await self._pull.recv_pyobj()
            try:
                self._deliver(msg)
            except Exception:  # a bug in one handler must not stop every request
                logger.exception("handling a %s from the scheduler failed", type(msg).__name__)

    async def _watchdog(self) -> None:
        assert self._deliver is not None
        while True:
            await asyncio.sleep(0.2)
            if self.process is not None and not self.process.is_alive():
                self._deliver(SchedulerFailed(
                    f"the scheduler process exited unexpectedly (exit code {self.process.exitcode})"))
                return
            dead = next((i for i, p in enumerate(self.workers) if not p.is_alive()), None)
            if dead is not None:
                proc = self.workers[dead]
                self._deliver(SchedulerFailed(
                    f"tensor-parallel rank {dead + 1} (pid {proc.pid}) exited unexpectedly (exit code {proc.exitcode}); "
                    "the model cannot run without it"))
                return
