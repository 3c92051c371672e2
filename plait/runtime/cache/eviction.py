"""Eviction orders for the tiered radix cache, chosen by name (`--radix-eviction-policy`).

Each maps a node to a sort key; the smallest key is evicted first.

- `lru`: least recently used first.
- `lfu`: fewest hits first, least recently used among equals.
- `workflow`: largest steps-to-execution first (nodes no known workflow step needs are `inf`, so
  they go before any that one does), least recently used among equals (KVFlow's order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from plait.runtime.cache.tiers import TierNode
    from plait.runtime.cache.workflow import WorkflowTracker

EvictionKey = tuple[float, float]


def _lru(node: TierNode, workflows: WorkflowTracker) -> EvictionKey:
    return (0.0, node.last_access_time)


def _lfu(node: TierNode, workflows: WorkflowTracker) -> EvictionKey:
    return (node.hit_count, node.last_access_time)


def _workflow(node: TierNode, workflows: WorkflowTracker) -> EvictionKey:
    steps = workflows.tags_steps(node.tags) if node.tags else float("inf")
    return (-steps, node.last_access_time)


EVICTION_POLICIES: dict[str, Callable[[TierNode, WorkflowTracker], EvictionKey]] = {
    "lru": _lru,
    "lfu": _lfu,
    "workflow": _workflow,
}


def workflow_key_for(steps: float) -> EvictionKey:
    """Under `workflow`, nodes with keys below this one are needed later than `steps` from now."""
    return (-steps, float("-inf"))
