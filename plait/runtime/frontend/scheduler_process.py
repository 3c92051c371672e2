"""The server's scheduler process: loads the model and runs the driver loop over ZMQ sockets.

Detokenization stays in this process: the scheduler already produces text deltas with stop
strings handled where the tokens are, so a separate detokenizer process would only add a hop.
The process exits when its parent (the HTTP process) dies, within a fraction of a second even in
the middle of a request: a watcher thread checks the parent, independent of the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from plait.runtime.distributed.ranks import TpLaunch
from plait.runtime.frontend.messages import FromScheduler, SchedulerFailed, ToScheduler

logger = logging.getLogger(__name__)

ORPHAN_CHECK_INTERVAL_S = 0.1


@dataclass(frozen=True)
class SchedulerProcessArgs:
    runtime_options: dict[str, Any]
    requests_address: str  # front end -> scheduler
    outputs_address: str  # scheduler -> front end
    log_level: str = "info"
    stats_log_interval: float = 5.0
    parent_pid: int = 0  # exit when this process is gone (0: do not watch)
    tp: TpLaunch | None = None  # this process's tensor-parallel rank (None: a single rank)
    num_threads: int | None = None  # CPU threads of the model (None: PyTorch's default)
    cpu_ids: tuple[int, ...] | None = None  # cores to run on (None: any)


def run_scheduler_process(args: SchedulerProcessArgs) -> None:
    """Entry point of the process (a `multiprocessing` spawn target). Exits 1 on any failure,
    after telling the front end why."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s scheduler: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the HTTP process decides
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.parent_pid:
        threading.Thread(target=_exit_when_orphaned, args=(args.parent_pid,), name="orphan-watch",
                         daemon=True).start()
    context = zmq.Context()
    channel = ZmqChannel(context, args.requests_address, args.outputs_address)
    failure: list[BaseException] = []

    def work() -> None:
        from plait.runtime.frontend.driver import SchedulerDriver

        try:
            runner, config = _make_runner(args)
            SchedulerDriver(runner, config, channel, stats_log_interval=args.stats_log_interval).run()
            runner.stop_workers()  # a clean stop: the other ranks leave their loops
        except BaseException as e:  # anything: the front end must hear of it, not wait forever
            logger.exception("the scheduler failed")
            where = f"tensor-parallel rank 0 of {args.tp.size}: " if args.tp is not None else ""
            channel.send(SchedulerFailed(f"{where}{type(e).__name__}: {e}"))
            failure.append(e)

    # The loop runs on a second thread, as in the Engine (see InProcessTransport).
    thread = threading.Thread(target=work, name="plait-scheduler")
    thread.start()
    thread.join()
    channel.close()
    context.term()
    sys.exit(1 if failure else 0)


def run_worker_process(args: SchedulerProcessArgs) -> None:
    """Entry point of a tensor-parallel rank other than 0: the model shard, driven by rank 0's
    scheduler (plait/runtime/distributed/lockstep.py). Exits 1 when a peer dies."""
    assert args.tp is not None and args.tp.rank > 0
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s rank {args.tp.rank}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.parent_pid:
        threading.Thread(target=_exit_when_orphaned, args=(args.parent_pid,), name="orphan-watch",
                         daemon=True).start()
    from plait.runtime.distributed.lockstep import run_worker_loop

    try:
        runner, _ = _make_runner(args)
        run_worker_loop(runner)
    except BaseException:
        logger.exception("tensor-parallel rank %d failed", args.tp.rank)
        sys.exit(1)
    sys.exit(0)


def _make_runner(args: SchedulerProcessArgs) -> tuple[Any, Any]:
    """This rank's model runner and the runtime configuration, after joining the tensor-parallel group."""
    import torch

    from plait.runtime.config import RuntimeConfig
    from plait.runtime.distributed.parallel import init_tensor_parallel, rank_device
    from plait.runtime.executor.model_runner import ModelRunner

    if args.cpu_ids:
        os.sched_setaffinity(0, set(args.cpu_ids))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    options = dict(args.runtime_options)
    if args.tp is not None:
        options["device"] = rank_device(options.get("device", "auto"), args.tp)
        logger.info("tensor-parallel rank %d of %d in pid %d", args.tp.rank, args.tp.size, os.getpid())
    config = RuntimeConfig.from_options(**options)
    tp = init_tensor_parallel(args.tp, config.model.device)
    return ModelRunner(config.model, config.memory, tp=tp), config


def _exit_when_orphaned(parent_pid: int) -> None:
    """The HTTP process died (kill -9): nobody will read what the scheduler produces, so stop at
    once, mid-step if need be, rather than generating on at full CPU."""
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_CHECK_INTERVAL_S)
    logger.warning("the HTTP process is gone; exiting")
    os._exit(1)


class ZmqChannel:
    """The scheduler's end of the ZMQ transport (a PULL and a PUSH socket)."""

    def __init__(self, context: zmq.Context, requests_address: str, outputs_address: str):
        self.inbox = context.socket(zmq.PULL)
        self.inbox.connect(requests_address)
        self.outbox = context.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.SNDHWM, 0)
        self.outbox.connect(outputs_address)
        self._send_lock = threading.Lock()  # the loop thread and the failure path may both send

    def receive(self, timeout: float) -> list[ToScheduler]:
        if not self.inbox.poll(int(timeout * 1000)):
            return []
        msgs = []
        while True:
            try:
                msgs.append(self.inbox.recv_pyobj(zmq.NOBLOCK))
            except zmq.Again:
                return msgs

    def send(self, msg: FromScheduler) -> None:
        with self._send_lock:
            self.outbox.send_pyobj(msg)

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.outbox.close(linger=2000)  # deliver the last outputs or the failure message
