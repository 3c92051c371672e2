"""Where the ranks of each model replica run: the launcher's arithmetic (no torch here, the HTTP
process imports it).

    replica d, tensor-parallel rank r  ->  node r // ranks_per_node, local rank r % ranks_per_node

Each replica's ranks meet at their own rendezvous (`TpLaunch.init_method`): the given
--dist-init-addr (replica d on its port + d), else a free local port.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class TpLaunch:
    """What a rank process needs to join its group (picklable; made by the launcher)."""

    rank: int
    size: int
    init_method: str  # "tcp://host:port" of rank 0's rendezvous
    local_rank: int = 0  # index among this node's ranks of the replica: the GPU it takes


def node_launches(*, tp_size: int, nnodes: int, node_rank: int, init_method: str) -> list[TpLaunch]:
    """The ranks of one replica that run on node `node_rank`."""
    assert tp_size % nnodes == 0 and 0 <= node_rank < nnodes
    per_node = tp_size // nnodes
    return [TpLaunch(node_rank * per_node + i, tp_size, init_method, local_rank=i) for i in range(per_node)]


def init_method_for(dist_init_addr: str | None, replica: int) -> str:
    """The rendezvous of replica `replica`: HOST:PORT+replica, or a free port on this machine."""
    if dist_init_addr:
        host, _, port = dist_init_addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--dist-init-addr must be HOST:PORT, got {dist_init_addr!r}")
        return f"tcp://{host}:{int(port) + replica}"
    return f"tcp://127.0.0.1:{rendezvous_port()}"


def rendezvous_port() -> int:
    """A free port on this machine below the kernel's range of ephemeral ports. A port from that range
    (what binding port 0 gives) can be taken, while rank 0 is still starting, by another rank's own
    connection attempt to it: the kernel may pick the very port as the attempt's source and connect the
    socket to itself, and rank 0 then fails with "address already in use"."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    candidates = range(max(1024, low - 10000), low)
    for port in random.sample(candidates, min(50, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below taken: an ephemeral port after all
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_slices(num_processes: int) -> list[tuple[int, ...] | None]:
    """Disjoint sets of this process's cores, one per model process (None each when there are fewer
    cores than processes): replicas and ranks on one CPU must not fight over the same cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if num_processes <= 1 or len(cores) < num_processes:
        return [None] * num_processes
    per = len(cores) // num_processes
    return [tuple(cores[i * per : (i + 1) * per]) for i in range(num_processes)]
