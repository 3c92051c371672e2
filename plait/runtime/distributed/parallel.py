"""The tensor-parallel group of one model replica, and the collectives the model layers call.

One process per rank. `init_tensor_parallel` joins the group through `torch.distributed`: gloo on
the CPU (so every machine can run and test it), NCCL between GPUs with a second gloo group for the
scheduler's messages (Python objects travel on the host). With one rank every collective is the
identity and no process group exists, so the single-device path is unchanged.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch

from plait.runtime.distributed.ranks import TpLaunch

logger = logging.getLogger(__name__)

# Ranks other than 0 wait inside a broadcast for the scheduler's next step, also while the server
# is idle for hours; a peer that dies closes its sockets and fails the wait at once, so the
# timeout only bounds a peer that hangs.
_GROUP_TIMEOUT = datetime.timedelta(days=7)


class TensorParallel:
    """This process's place in its tensor-parallel group.

    `group` carries the model's tensors (gloo on CPU, NCCL on GPU); `cpu_group` carries the
    scheduler's objects (always gloo). Both are None with one rank."""

    def __init__(self, rank: int = 0, size: int = 1, *, group: Any = None, cpu_group: Any = None,
                 backend: str = "none"):
        assert 0 <= rank < size
        self.rank, self.size = rank, size
        self.group, self.cpu_group = group, cpu_group
        self.backend = backend

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler; the others only run the steps it broadcasts."""
        return self.rank == 0

    # ---- collectives of the model layers -------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `x` (the partial products of a row-parallel layer), in place."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's equally sized `x` [..., n] concatenated along the last dimension: [..., size * n]."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    # ---- the scheduler's messages ------------------------------------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (the others pass nothing and receive it)."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype), on the tensor group."""
        torch.distributed.broadcast(x, src=0, group=self.group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (sizes every rank must agree on)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def describe(self) -> dict[str, Any]:
        return {"tp_size": self.size, "tp_rank": self.rank, "backend": self.backend}


SINGLE = TensorParallel()


def init_tensor_parallel(launch: TpLaunch | None, device: str) -> TensorParallel:
    """Join the group described by `launch` (None: a single rank). `device` is the runtime's device
    option; on CUDA each rank takes the GPU of its local rank. Blocks until every rank has joined."""
    if launch is None or launch.size == 1:
        return SINGLE
    dist = torch.distributed
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu:
        torch.cuda.set_device(launch.local_rank)
    backend = "nccl" if on_gpu else "gloo"
    logger.info("tensor parallelism: rank %d of %d joining %s (%s)", launch.rank, launch.size,
                launch.init_method, backend)
    dist.init_process_group(backend, init_method=launch.init_method, rank=launch.rank, world_size=launch.size,
                            timeout=_GROUP_TIMEOUT)
    group = dist.group.WORLD
    cpu_group = group if backend == "gloo" else dist.new_group(backend="gloo", timeout=_GROUP_TIMEOUT)
    return TensorParallel(launch.rank, launch.size, group=group, cpu_group=cpu_group, backend=backend)


def rank_device(device: str, launch: TpLaunch | None) -> str:
    """The device option of a rank: on CUDA the GPU of its local rank, else unchanged."""
    if launch is None or launch.size == 1 or not (device.startswith("cuda") or device == "auto"):
        return device
    if device == "auto" and not torch.cuda.is_available():
        return device
    return f"cuda:{launch.local_rank}"

