"""Workflow prefetch: which contexts of a workflow's next step come back to the device, and whether
they fit.

When a workflow moves to a step, the agents of the step after it will run next; their contexts (the
cache node each agent's last run left, `WorkflowTracker.agent_node`) that sit on the host or in a file
start loading in the background. A prefetch may take free slots and those of nodes needed later than
the next step, less the room this step itself will want: the contexts of every workflow's current
agents that are off the device (their requests load them on demand, and such a load would evict a
prefetched context again) and a caller's `budget` (the scheduler's spare slots after running and
waiting requests). A context that does not fit is skipped (`prefetch_skipped`), never half-loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from plait.runtime.cache.eviction import workflow_key_for
from plait.runtime.cache.tiers import LoadJob, TierNode

if TYPE_CHECKING:
    from plait.runtime.cache.hiradix_cache import HiRadixCache


def prefetch_next_step(cache: HiRadixCache, workflow_id: str, *, budget: int | None = None) -> list[LoadJob]:
    """Start the loads of the workflow's next-step contexts that fit (see the module docstring)."""
    if not cache.prefetch_enabled:
        return []
    workflows = cache.workflows
    below = workflow_key_for(1) if cache.eviction_policy == "workflow" else None
    room = cache.allocator.num_free_slots + (cache.device_freeable(below) if below is not None else 0)
    room -= off_device_tokens(cache.root, (workflows.agent_node(w, a) for w, a in workflows.current_agents()))
    jobs = []
    for agent in workflows.next_agents(workflow_id):
        node = workflows.agent_node(workflow_id, agent)
        if node is None or not node.in_tree:
            continue
        run: list[TierNode] = []  # the off-device part of the context, deepest first
        while node is not cache.root and node.value is None:
            if node.loading is not None:
                run = []
                break
            run.append(node)
            node = node.parent
        if not run:
            continue
        run.reverse()
        run_size = sum(len(n.key) for n in run)
        size = run_size  # plus the device part it locks meanwhile:
        while node is not cache.root:
            size, node = size + len(node.key), node.parent
        if (budget is not None and size > budget) or run_size > room:
            cache.tier_stats.prefetch_skipped += 1
            continue
        job = cache.loads.start(run, prefetch=True, below=below, workflow_id=workflow_id)
        if job is not None:
            jobs.append(job)
            room -= run_size
            if budget is not None:
                budget -= size
    return jobs


def off_device_tokens(root: TierNode, nodes: Iterable[TierNode | None]) -> int:
    """Tokens along the paths to `nodes` that are neither on the device nor being loaded (each node
    counted once)."""
    seen: set[int] = set()
    total = 0
    for node in nodes:
        while node is not None and node is not root and node.in_tree and node.id not in seen:
            seen.add(node.id)
            if node.value is None and node.loading is None:
                total += len(node.key)
            node = node.parent
    return total
