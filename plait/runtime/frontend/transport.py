"""How the front end reaches its scheduler: the interface, and the in-process transport of the `Engine`.

A transport carries `ToScheduler` messages one way and hands every `FromScheduler` message to the
front end's `deliver` callback the other way, on the transport's own thread or event loop. A
scheduler that dies shows up as a `SchedulerFailed` message like any other. The HTTP server's
transport, over ZMQ to a scheduler process, is in `zmq_transport.py`.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable

from plait.runtime.frontend.driver import SchedulerDriver
from plait.runtime.frontend.messages import FromScheduler, SchedulerFailed, Shutdown, ToScheduler

if TYPE_CHECKING:
    from plait.runtime.config import RuntimeConfig
    from plait.runtime.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

Deliver = Callable[[FromScheduler], None]


class Transport(ABC):
    @abstractmethod
    def start(self, deliver: Deliver) -> None:
        """Start carrying messages; every message from the scheduler goes to `deliver`."""

    @abstractmethod
    def send(self, msg: ToScheduler) -> None:
        """Never blocks (an abort may be sent from a `finally` of a cancelled task)."""

    def describe(self) -> dict[str, Any]:
        """Facts about what is behind the transport, for the server info (data-parallel replicas)."""
        return {}


class InProcessTransport(Transport):
    """The scheduler driver on a thread of this process. Messages to it go through a queue; its
    messages are delivered by a direct call on its thread (the front end's tracker is thread-safe).

    The thread, not the caller's, builds and runs the model (`make_runner` runs on it). A thread that
    runs OpenMP work gets its own pool of OpenMP threads: had the caller's thread loaded the model
    (packing the weights runs parallel torch operations) and this one run it, the process would hold
    two pools, more OpenMP threads than a small machine has cores, and libgomp then stops spinning at
    its barriers and sleeps in the kernel instead: on 2 cores a 32-row decode step took 51 ms in the
    model's layers instead of 34."""

    def __init__(self, make_runner: Callable[[], ModelRunner], config: RuntimeConfig):
        self._inbox: queue.SimpleQueue[ToScheduler] = queue.SimpleQueue()
        self._deliver: Deliver | None = None
        self._config = config
        self._make_runner = make_runner
        self._built = threading.Event()
        self._go = threading.Event()  # start() or close(): run the driver, or leave
        self._build_error: BaseException | None = None
        self.runner: ModelRunner | None = None
        self.driver: SchedulerDriver | None = None
        self._thread = threading.Thread(target=self._run, name="plait-scheduler", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._go.set()

    def send(self, msg: ToScheduler) -> None:
        self._inbox.put(msg)

    def close(self, timeout: float = 10.0) -> None:
        """Abort what is running, stop the driver and wait for its thread."""
        if self._thread.is_alive():
            self._inbox.put(Shutdown())
            self._go.set()
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.runner = self._make_runner()
            self.driver = SchedulerDriver(self.runner, self._config, _QueueChannel(self))
        except BaseException as e:  # the constructor re-raises it on the caller's thread
            self._build_error = e
            return
        finally:
            self._built.set()
        self._go.wait()
        if self._deliver is None:  # closed before it started
            self.driver.scheduler.constraints.shutdown()
            return
        try:
            self.driver.run()
        except BaseException as e:  # surface to every waiting caller instead of hanging them
            logger.exception("the scheduler failed")
            self._emit(SchedulerFailed(f"the scheduler has stopped: {type(e).__name__}: {e}"))
        finally:
            self.driver.scheduler.constraints.shutdown()

    def _emit(self, msg: FromScheduler) -> None:
        assert self._deliver is not None
        self._deliver(msg)


class _QueueChannel:
    def __init__(self, transport: InProcessTransport):
        self.transport = transport

    def receive(self, timeout: float) -> list[ToScheduler]:
        inbox = self.transport._inbox
        try:
            msgs = [inbox.get(timeout=timeout) if timeout > 0 else inbox.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                msgs.append(inbox.get_nowait())
            except queue.Empty:
                return msgs

    def send(self, msg: FromScheduler) -> None:
        self.transport._emit(msg)
