"""Lock step: the scheduler on rank 0 drives the model workers on the other ranks.

Only rank 0 schedules. Before each forward pass it broadcasts the step's decisions (a
`StepMessage`: the batch's index lists and the `req_to_token` writes made since the last step) on
the group's gloo channel; every other rank rebuilds the same `ForwardBatch` over its own KV pool
shard and runs the same forward, so the collectives inside the model pair up. Workers compute
logits too (the gather is a collective) and drop them: only rank 0 samples.

The workers' `req_to_token` tables mirror rank 0's by replaying its writes (`TableJournal`), which
are a few integers per new token, instead of sending each request's whole row every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from plait.runtime.distributed.parallel import TensorParallel
    from plait.runtime.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


# ---- messages from rank 0 to the workers -------------------------------------------------------------
@dataclass
class RowWrite:
    """`req_to_token[row, start : start + len(slots)] = slots`."""

    row: int
    start: int
    slots: list[int]


@dataclass
class PointWrite:
    """`req_to_token[rows[i], positions[i]] = slots[i]` (a decode step's new tokens)."""

    rows: list[int]
    positions: list[int]
    slots: list[int]


@dataclass
class StepMessage:
    """One forward pass, as rank 0's scheduler decided it."""

    mode: ForwardMode
    input_ids: list[int] | None  # None: the ids follow as a tensor broadcast (still on the device, overlap)
    num_tokens: int
    positions: list[int]
    out_cache_loc: list[int]
    req_pool_indices: list[int]
    seq_lens: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    logits_start_lens: list[int | None] | None
    shared_prefixes: list[tuple[list[int], int]] | None
    table_writes: list[RowWrite | PointWrite] = field(default_factory=list)


@dataclass
class ReleaseMemory:
    """The cache was flushed: give the KV pool's pages back (CPU)."""


@dataclass
class StopWorkers:
    """The scheduler is stopping: leave the loop and exit."""


# ---- rank 0 ------------------------------------------------------------------------------------------
class TableJournal:
    """The `req_to_token` writes since the last broadcast (kept only on rank 0 under TP)."""

    def __init__(self) -> None:
        self.writes: list[RowWrite | PointWrite] = []

    def row(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.writes.append(RowWrite(row, start, slots.tolist()))

    def points(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        self.writes.append(PointWrite(rows.tolist(), positions.tolist(), slots.tolist()))

    def take(self) -> list[RowWrite | PointWrite]:
        writes, self.writes = self.writes, []
        return writes


class StepSender:
    """Rank 0's side: announce each step (and the rare control message) to the workers."""

    def __init__(self, tp: TensorParallel, journal: TableJournal):
        assert tp.is_driver and tp.size > 1
        self.tp = tp
        self.journal = journal

    def send_step(self, batch: ForwardBatch) -> None:
        on_host = batch.input_ids.device.type == "cpu"
        msg = StepMessage(
            mode=batch.mode,
            input_ids=batch.input_ids.tolist() if on_host else None,
            num_tokens=batch.num_tokens,
            positions=batch.positions.tolist(),
            out_cache_loc=batch.out_cache_loc.tolist(),
            req_pool_indices=batch.req_pool_indices_cpu or batch.req_pool_indices.tolist(),
            seq_lens=list(batch.seq_lens_cpu),
            prefix_lens=list(batch.prefix_lens_cpu),
            extend_lens=list(batch.extend_lens_cpu),
            logits_start_lens=batch.logits_start_lens,
            shared_prefixes=batch.shared_prefixes,
            table_writes=self.journal.take(),
        )
        self.tp.broadcast_object(msg)
        if not on_host:
            self.tp.broadcast_tensor(batch.input_ids)

    def send(self, msg: ReleaseMemory | StopWorkers) -> None:
        self.tp.broadcast_object(msg)


# ---- the other ranks -----------------------------------------------------------------------------------
def run_worker_loop(runner: ModelRunner) -> None:
    """Ranks > 0: run every step rank 0 announces, until `StopWorkers` (or a collective fails because a
    peer died, which raises)."""
    tp = runner.tp
    assert not tp.is_driver
    steps = 0
    while True:
        msg: Any = tp.broadcast_object(None)
        if isinstance(msg, StepMessage):
            runner.forward(_rebuild(runner, msg))
            steps += 1
        elif isinstance(msg, ReleaseMemory):
            runner.kv_pool.release_memory()
        elif isinstance(msg, StopWorkers):
            logger.info("rank %d: stopping after %d steps", tp.rank, steps)
            return
        else:
            raise RuntimeError(f"rank {tp.rank}: unknown message {type(msg).__name__} from rank 0")


def _rebuild(runner: ModelRunner, msg: StepMessage) -> ForwardBatch:
    device = runner.device
    table = runner.req_to_token_pool.req_to_token
    for w in msg.table_writes:
        if isinstance(w, RowWrite):
            table[w.row, w.start : w.start + len(w.slots)] = torch.tensor(w.slots, dtype=torch.int64, device=device)
        else:
            table[_ids(w.rows, device), _ids(w.positions, device)] = _ids(w.slots, device)
    if msg.input_ids is None:
        input_ids = runner.tp.broadcast_tensor(torch.empty(msg.num_tokens, dtype=torch.int64, device=device))
    else:
        input_ids = _ids(msg.input_ids, device)
    batch = ForwardBatch(
        mode=msg.mode,
        input_ids=input_ids,
        positions=_ids(msg.positions, device),
        out_cache_loc=_ids(msg.out_cache_loc, device),
        req_pool_indices=_ids(msg.req_pool_indices, device),
        seq_lens=_ids(msg.seq_lens, device),
        seq_lens_cpu=msg.seq_lens,
        prefix_lens_cpu=msg.prefix_lens,
        extend_lens_cpu=msg.extend_lens,
        req_to_token_pool=runner.req_to_token_pool,
        kv_pool=runner.kv_pool,
        attn_backend=runner.attn_backend,
        logits_start_lens=msg.logits_start_lens,
        shared_prefixes=msg.shared_prefixes,
        req_pool_indices_cpu=msg.req_pool_indices,
    )
    batch.check()
    return batch


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)
