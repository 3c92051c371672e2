"""Pieces of the tiered cache: its node, its counters, and the loads that bring KV back to the device
(`LoadManager`, one per cache).

A load (`LoadJob`) copies the host or file copies of a run of nodes into device slots on a worker
thread while the scheduler keeps stepping. The scheduler thread owns the tree: it starts a job
(allocates the slots, marks the nodes `loading`, locks them) and finishes it (`poll`: the nodes get
their device slots and lose the mark; a cancelled job's slots go back to the free list). The worker
touches only the job's own slot tensors and the tier buffers, never the tree.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from plait.runtime.cache.base import TreeNode

if TYPE_CHECKING:
    from plait.runtime.cache.hiradix_cache import HiRadixCache
    from plait.runtime.memory.host_pool import FileStorage, HostKVPool, StorageRef

logger = logging.getLogger(__name__)


class TierNode(TreeNode):
    """A radix node whose KV lives in one or more tiers.

    `value` holds device slots, or None once evicted from the device; `host_value` host slots or
    None; `storage` a file slice or None. Every node in the tree is in at least one tier, and the
    device-resident nodes form a subtree at the root (a node off the device has no descendant on it),
    so a match's device part is a prefix of it.
    """

    __slots__ = ("host_value", "storage", "loading", "hit_count", "tags", "prefetched")

    def __init__(self, key: list[int], value: torch.Tensor | None, parent: TreeNode | None, last_access_time: int = 0):
        super().__init__(key, value, parent, last_access_time)
        self.host_value: torch.Tensor | None = None  # [len(key)] host slot ids
        self.storage: StorageRef | None = None
        self.loading: LoadJob | None = None  # the job filling its device slots
        self.hit_count = 0
        self.tags: set[tuple[str, str]] | None = None  # (workflow_id, agent) of the runs that used it
        self.prefetched = False  # loaded by a prefetch and not matched since


@dataclass
class TierStats:
    """Cumulative counters of tier traffic, in tokens unless the name says bytes."""

    device_hit_tokens: int = 0  # admitted prompt tokens found on the device
    host_hit_tokens: int = 0  # tokens requests found on the host and loaded back
    storage_hit_tokens: int = 0  # ... found in the file tier and loaded back
    backup_tokens: int = 0  # device -> host copies
    load_tokens: int = 0  # host/file -> device copies (loads and prefetches)
    storage_write_tokens: int = 0  # host -> file
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    bytes_to_storage: int = 0
    prefetch_started: int = 0  # jobs
    prefetch_tokens: int = 0
    prefetch_hits: int = 0  # requests that found (part of) their prefix already prefetched
    prefetch_late: int = 0  # requests that found their prefix still being prefetched, and waited
    prefetch_unused_tokens: int = 0  # prefetched tokens evicted again before any request matched them
    prefetch_skipped: int = 0  # next-step contexts not prefetched: no room that this step's needs leave
    loads_cancelled: int = 0  # jobs cancelled (their requests aborted)
    device_evicted_tokens: int = 0  # left the device, still on the host or in a file
    host_evicted_tokens: int = 0  # host copies dropped (moved to a file, or gone)
    backups_skipped_tokens: int = 0  # not copied to a full host: all there is needed sooner (workflow)
    dropped_tokens: int = 0  # left every tier
    evictions_by_policy: dict[str, int] = field(default_factory=dict)  # device evictions, in tokens

    def flat(self) -> dict[str, int]:
        out = {k: v for k, v in self.__dict__.items() if k != "evictions_by_policy"}
        out.update({f"evicted_tokens_{k}": v for k, v in self.evictions_by_policy.items()})
        return out


@dataclass
class LoadSegment:
    node: TierNode
    device_slots: torch.Tensor  # [len(node.key)]
    host_slots: torch.Tensor | None  # the source: host rows, or else
    storage: StorageRef | None  # a file slice


class LoadJob:
    def __init__(self, segments: list[LoadSegment], lock_node: TierNode, *, is_prefetch: bool,
                 workflow_id: str | None = None):
        self.segments = segments
        self.lock_node = lock_node  # locked by the job until it is finished
        self.is_prefetch = is_prefetch
        self.workflow_id = workflow_id  # a prefetch's workflow
        self.num_tokens = sum(s.device_slots.numel() for s in segments)
        self.waiters = 0  # requests waiting for it
        self.cancelled = False
        self.completed = False  # the copies all ran (set by the worker)
        self.finished = False  # the scheduler applied the result (or dropped it)
        self.done = threading.Event()
        self.error: BaseException | None = None

    def cancel(self) -> None:
        self.cancelled = True


class KVLoader:
    """Runs load jobs one after another on a worker thread (or inline with `background=False`)."""

    def __init__(self, host: HostKVPool, storage: FileStorage | None, *, background: bool = True):
        self.host = host
        self.storage = storage
        self.background = background
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="plait-kv-load") if background else None
        self.gate: threading.Event | None = None  # tests: hold jobs until set

    def submit(self, job: LoadJob) -> None:
        if self._executor is None:
            self._run(job)
        else:
            self._executor.submit(self._run, job)

    def _run(self, job: LoadJob) -> None:
        try:
            if self.gate is not None:
                self.gate.wait()
            ok = True
            for seg in job.segments:
                if not ok or job.cancelled:
                    ok = False
                    break
                stop = lambda: job.cancelled  # noqa: E731
                if seg.host_slots is not None:
                    ok = self.host.load(seg.host_slots, seg.device_slots, cancelled=stop)
                else:
                    assert self.storage is not None and seg.storage is not None
                    ok = self.host.load_rows(self.storage.read(seg.storage), seg.device_slots, cancelled=stop)
            job.completed = ok and not job.cancelled
        except BaseException as e:  # the scheduler drops the job and logs this
            job.error = e
        finally:
            job.done.set()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=False)


class LoadManager:
    """The loads in flight of one tiered cache: starts them (device slots, `loading` marks, a lock
    on the run), applies the finished ones between two scheduler steps, cancels. Scheduler thread
    only; the copies run on the `KVLoader`'s thread."""

    def __init__(self, cache: HiRadixCache, loader: KVLoader | None):
        self.cache = cache
        self.loader = loader  # None: no tier to load from
        self.jobs: list[LoadJob] = []

    @property
    def tokens_in_flight(self) -> int:
        """Device slots held by loads not yet applied."""
        return sum(job.num_tokens for job in self.jobs)

    def start(self, nodes: list[TierNode], *, prefetch: bool = False, below: tuple | None = None,
              workflow_id: str | None = None) -> LoadJob | None:
        """Bring `nodes` (a run right below the device part, parents first) back to the device.
        None if there is nothing to load from or the device has no room (evicting only keys below
        `below`, when given)."""
        if self.loader is None or not nodes:
            return None
        cache = self.cache
        assert all(n.value is None and n.loading is None for n in nodes)
        num_tokens = sum(len(n.key) for n in nodes)
        lock_node = nodes[-1]
        cache.lock(lock_node)  # the device ancestors stay, and so do the lower copies
        slots = cache.allocator.alloc(num_tokens)
        if slots is None and below is not None:
            # Evict only if that makes room for the whole run: a prefetch that evicted and then
            # failed would have displaced nodes (and written them back) for nothing.
            if cache.allocator.num_free_slots + cache.device_freeable(below) < num_tokens:
                cache.unlock(lock_node)
                return None
        if slots is None:
            cache.evict(num_tokens - cache.allocator.num_free_slots, below=below)
            slots = cache.allocator.alloc(num_tokens)
        if slots is None:
            cache.unlock(lock_node)
            return None
        segments, offset = [], 0
        for node in nodes:
            n = len(node.key)
            segments.append(LoadSegment(node, slots[offset : offset + n], node.host_value,
                                        node.storage if node.host_value is None else None))
            offset += n
        job = LoadJob(segments, lock_node, is_prefetch=prefetch, workflow_id=workflow_id)
        for seg in segments:
            seg.node.loading = job
        self.jobs.append(job)
        stats = cache.tier_stats
        if prefetch:
            stats.prefetch_started += 1
            stats.prefetch_tokens += num_tokens
        else:
            for seg in segments:
                if seg.host_slots is not None:
                    stats.host_hit_tokens += seg.device_slots.numel()
                else:
                    stats.storage_hit_tokens += seg.device_slots.numel()
        self.loader.submit(job)
        return job

    def poll(self) -> list[LoadJob]:
        """Apply the jobs the loader has finished; returns them."""
        done = [job for job in self.jobs if job.done.is_set()]
        for job in done:
            self.jobs.remove(job)
            self._finish(job)
        return done

    def wait(self, timeout: float | None = None) -> None:
        """Block until a load is done (or `timeout` seconds pass), then apply what is done."""
        if self.jobs:
            self.jobs[0].done.wait(timeout)
        self.poll()

    def _finish(self, job: LoadJob) -> None:
        cache = self.cache
        ok = job.completed and not job.cancelled and job.error is None
        if job.error is not None:
            logger.error("loading KV back to the device failed: %r", job.error)
        for seg in job.segments:
            seg.node.loading = None
            if ok:
                cache._set_device(seg.node, seg.device_slots.to("cpu", copy=True))
                seg.node.prefetched = job.is_prefetch
        if ok:
            cache.tier_stats.load_tokens += job.num_tokens
            cache.tier_stats.bytes_to_device += job.num_tokens * self.loader.host.bytes_per_token
        else:
            cache.allocator.free(torch.cat([seg.device_slots for seg in job.segments]))
            if job.cancelled:
                cache.tier_stats.loads_cancelled += 1
        job.finished = True
        cache.unlock(job.lock_node)

    def release_waiter(self, job: LoadJob) -> None:
        """A request that waited for `job` left; a request's own load nobody else waits for stops."""
        job.waiters -= 1
        if job.waiters <= 0 and not job.is_prefetch and not job.finished:
            job.cancel()

    def cancel_prefetches(self, workflow_id: str) -> int:
        """Stop the workflow's prefetches no request waits for (a request of it was aborted: the
        workflow is not going on). Returns how many were cancelled."""
        jobs = [j for j in self.jobs if j.is_prefetch and j.workflow_id == workflow_id and j.waiters <= 0
                and not j.cancelled]
        for job in jobs:
            job.cancel()
        return len(jobs)

    def cancel_all(self) -> None:
        """Cancel every load and wait until each has stopped and been undone."""
        for job in self.jobs:
            job.cancel()
        while self.jobs:
            self.wait(timeout=1.0)
