"""The model's processes behind one server: `--dp-size` replicas, each a scheduler process (its
tensor-parallel rank 0) and the processes of its other ranks on this node.

    HTTP process ── ZMQ ──► replica 0: scheduler (rank 0) ══ gloo/NCCL ══ rank 1 .. rank tp-1
                 ── ZMQ ──► replica 1: ...
                 (a DataParallelTransport picks the replica of each request)

On a node other than 0 (`--node-rank k`) there is no HTTP server: `serve_worker_node` runs that
node's ranks and exits when one of them does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from typing import Any, NamedTuple

from plait.runtime.distributed.ranks import TpLaunch, cpu_slices, init_method_for, node_launches

logger = logging.getLogger("plait.server")


class ModelProcesses(NamedTuple):
    transport: Any  # a Transport: one ZmqTransport, or a DataParallelTransport over one per replica
    processes: list[Any]  # every process started (multiprocessing.Process)


def start_model_processes(options: dict[str, Any], config: Any, ipc_dir: str) -> ModelProcesses:
    """Start every replica's processes on this node (node 0) and connect a transport to them."""
    from plait.runtime.frontend.dp_transport import DataParallelTransport
    from plait.runtime.frontend.zmq_transport import ZmqTransport

    ranks_here = config.tp_size // config.nnodes
    cores = cpu_slices(config.dp_size * ranks_here)
    transports, processes = [], []
    for replica in range(config.dp_size):
        requests_address, outputs_address = f"ipc://{ipc_dir}/requests{replica}", f"ipc://{ipc_dir}/outputs{replica}"
        launches: list[TpLaunch | None] = [None]
        if config.tp_size > 1:
            launches = list(node_launches(tp_size=config.tp_size, nnodes=config.nnodes, node_rank=0,
                                          init_method=init_method_for(config.dist_init_addr, replica)))
        procs = [
            _start(options, config, launch, cores[replica * ranks_here + i], requests_address, outputs_address,
                   name=_name(replica, launch, config.dp_size))
            for i, launch in enumerate(launches)
        ]
        transports.append(ZmqTransport(requests_address, outputs_address, process=procs[0], workers=procs[1:]))
        processes += procs
    if config.dp_size == 1:
        return ModelProcesses(transports[0], processes)
    return ModelProcesses(DataParallelTransport(transports, policy=config.load_balance_method), processes)


def serve_worker_node(options: dict[str, Any], config: Any) -> int:
    """Node `config.node_rank` > 0: run this node's tensor-parallel ranks until one exits (1 if any
    failed) or SIGTERM (0)."""
    launches = node_launches(tp_size=config.tp_size, nnodes=config.nnodes, node_rank=config.node_rank,
                             init_method=init_method_for(config.dist_init_addr, 0))
    cores = cpu_slices(len(launches))
    procs = [_start(options, config, launch, cores[i], "", "", name=_name(0, launch, 1))
             for i, launch in enumerate(launches)]
    logger.info("node %d of %d: ranks %s, meeting at %s", config.node_rank, config.nnodes,
                ", ".join(str(launch.rank) for launch in launches), launches[0].init_method)
    stopping = {"value": False}

    def stop(signum: int, frame: Any) -> None:
        stopping["value"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while not stopping["value"]:
        ended = [p for p in procs if not p.is_alive()]
        if ended:
            code = 0 if all(p.exitcode == 0 for p in ended) else 1
            if code:
                logger.error("%s exited (exit code %s); stopping this node", ended[0].name, ended[0].exitcode)
            break
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    return code


def _start(options: dict[str, Any], config: Any, launch: TpLaunch | None, cores: tuple[int, ...] | None,
           requests_address: str, outputs_address: str, *, name: str) -> Any:
    from plait.runtime.frontend.scheduler_process import (
        SchedulerProcessArgs,
        run_scheduler_process,
        run_worker_process,
    )

    args = SchedulerProcessArgs(
        runtime_options=options, requests_address=requests_address, outputs_address=outputs_address,
        log_level=config.log_level, stats_log_interval=config.stats_log_interval, parent_pid=os.getpid(),
        tp=launch, num_threads=len(cores) if cores else None, cpu_ids=cores,
    )
    target = run_scheduler_process if launch is None or launch.rank == 0 else run_worker_process
    process = multiprocessing.get_context("spawn").Process(target=target, name=name, daemon=True, args=(args,))
    process.start()
    return process


def _name(replica: int, launch: TpLaunch | None, dp_size: int) -> str:
    name = "plait-scheduler" if launch is None or launch.rank == 0 else f"plait-tp-rank{launch.rank}"
    return f"{name}-dp{replica}" if dp_size > 1 else name
