"""The tiered radix cache: the radix tree over a device pool, a host pool and a file store.

A node's KV may be on the device (`value`), on the host (`host_value`), in a file (`storage`), or in
several of them (`tiers.TierNode`). What the device pool cannot keep moves down instead of being
dropped, and a request whose prefix is found below the device loads it back before its prefill
is scheduled, which costs a copy instead of a recomputation.

- **Device eviction** takes unlocked device leaves (nodes with no child on the device) in the
  eviction policy's order. A node with a lower copy just frees its device slots and stays in the
  tree; one without is written back to the host first under `write_back` (or when descendants
  below it live on the host only), and otherwise leaves the tree with its subtree.
- **Write policies** (device -> host): `write_through` copies every new node at insert,
  `write_through_selective` copies a node once it has been hit twice, `write_back` copies only
  when evicting.
- **Host eviction**, when the host pool is full, drops host copies of nodes that are still on the
  device or already in a file, moves host-only nodes to the file tier when there is one, and
  otherwise deletes host-only leaves, in the same policy order.
- **Loads**: `match_tiers` reports the device prefix and the run of nodes below it; `loads.start`
  gives that run device slots and copies it on the loader's thread (`tiers.LoadManager`); `loads.poll`
  applies finished jobs. A node being loaded is locked, never split, and never evicted.
- **Workflows**: nodes carry `(workflow, agent)` tags; under the `workflow` policy eviction follows
  steps-to-execution (`workflow.py`), and `prefetch` loads the next step's agents' prefixes.

Size counters count device tokens only, so the allocator invariant is the plain cache's, with the
slots of loads in flight as one more owner.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from plait.runtime.cache.base import InsertResult, MatchResult, empty_slots
from plait.runtime.cache.eviction import EVICTION_POLICIES
from plait.runtime.cache.prefetch import prefetch_next_step
from plait.runtime.cache.radix_cache import RadixCache, common_prefix_len, stored_copy
from plait.runtime.cache.tiers import KVLoader, LoadJob, LoadManager, TierNode, TierStats
from plait.runtime.cache.workflow import WorkflowTracker
from plait.runtime.memory.host_pool import FileStorage, HostKVPool
from plait.runtime.memory.kv_pool import SlotAllocator

logger = logging.getLogger(__name__)

WRITE_POLICIES = ("write_through", "write_back", "write_through_selective")
SELECTIVE_HIT_THRESHOLD = 2  # write_through_selective: hits before a node is copied to the host
MAX_TAGS_PER_NODE = 64  # beyond this, tags of forgotten workflows are swept


class TierMatch(NamedTuple):
    device: MatchResult  # the device-resident prefix; lock `device.last_node` before use
    lower_nodes: list[TierNode]  # the run right below it, on the host or in files (loadable now)
    lower_len: int  # tokens in `lower_nodes`
    loading: LoadJob | None  # a job already bringing (part of) the rest back: wait for it
    prefetch_hit: bool  # part of the device prefix was brought by a prefetch


class HiRadixCache(RadixCache):
    def __init__(
        self,
        allocator: SlotAllocator,
        *,
        host: HostKVPool | None = None,
        storage: FileStorage | None = None,
        write_policy: str = "write_through",
        eviction_policy: str = "lru",
        prefetch: bool = False,
        background_loads: bool = True,
        workflows: WorkflowTracker | None = None,
    ):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"unknown hicache write policy {write_policy!r}; choose from {', '.join(WRITE_POLICIES)}")
        if eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"unknown eviction policy {eviction_policy!r}; choose from {', '.join(EVICTION_POLICIES)}")
        if storage is not None and host is None:
            raise ValueError("a storage tier needs the host tier (--enable-hierarchical-cache)")
        self.host = host
        self.storage = storage
        self.write_policy = write_policy
        self.eviction_policy = eviction_policy
        self._priority = EVICTION_POLICIES[eviction_policy]
        self.prefetch_enabled = prefetch and host is not None
        self.workflows = workflows or WorkflowTracker()
        self.tier_stats = TierStats()
        self.loader = KVLoader(host, storage, background=background_loads) if host is not None else None
        self.loads = LoadManager(self, self.loader)
        super().__init__(allocator)

    def _init_tree(self) -> None:
        super()._init_tree()
        self._host_size = 0  # tokens with a host copy

    def _make_node(self, key: list[int], value: torch.Tensor | None, parent: TierNode | None) -> TierNode:
        return TierNode(key, value, parent, self._clock)

    # The eviction order can change without any node changing (a workflow advances), so eviction
    # ranks the candidates when it runs instead of keeping a heap up to date.
    def _push(self, node: TierNode) -> None:
        pass

    def _rebuild_heap(self) -> None:
        pass

    @property
    def host_size(self) -> int:
        return self._host_size

    # --- lock / unlock: only device tokens count --------------------------------------------

    def lock(self, node: TierNode) -> None:
        assert node.in_tree, "locking an evicted node"
        while node is not self.root:
            if node.lock_ref == 0 and node.value is not None:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TierNode) -> None:
        assert node.in_tree, "unlocking an evicted node"
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without a matching lock"
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.value is not None:
                self._protected_size -= len(node.key)
                self._evictable_size += len(node.key)
            node = node.parent

    def _set_device(self, node: TierNode, slots: torch.Tensor) -> None:
        assert node.value is None and slots.numel() == len(node.key)
        assert node.parent is self.root or node.parent.value is not None, "the device part must stay a subtree"
        node.value = slots
        if node.lock_ref > 0:
            self._protected_size += len(node.key)
        else:
            self._evictable_size += len(node.key)

    # --- the walk ----------------------------------------------------------------------------

    def _split(self, child: TierNode, split_len: int) -> TierNode:
        assert 0 < split_len < len(child.key) and child.loading is None
        parent = child.parent
        value = None if child.value is None else child.value[:split_len]
        upper = TierNode(child.key[:split_len], value, parent, child.last_access_time)
        upper.lock_ref = child.lock_ref
        upper.hit_count = child.hit_count
        upper.tags = set(child.tags) if child.tags else None
        upper.prefetched = child.prefetched
        if child.host_value is not None:
            upper.host_value, child.host_value = child.host_value[:split_len], child.host_value[split_len:]
        if child.storage is not None:
            upper.storage = child.storage.slice(0, split_len)
            child.storage = child.storage.slice(split_len, len(child.key) - split_len)
            self.storage.add_ref(upper.storage)
        parent.children[child.key[0]] = upper
        child.key = child.key[split_len:]
        if child.value is not None:
            child.value = child.value[split_len:]
        child.parent = upper
        upper.children[child.key[0]] = child
        self._num_nodes += 1
        return upper

    def _walk_path(self, tokens: list[int], *, hit: bool) -> tuple[list[TierNode], int, TierNode | None]:
        """The nodes `tokens` runs through (an edge where they diverge is split), the matched
        length, and the node being loaded where the walk had to stop inside its edge (or None)."""
        now = self._tick()
        node, pos, path = self.root, 0, []
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            matched = common_prefix_len(child.key, tokens, pos)
            inside = matched < len(child.key)
            if inside:
                if child.loading is not None:
                    return path, pos, child
                child = self._split(child, matched)
            child.last_access_time = now
            if hit:
                child.hit_count += 1
            path.append(child)
            node, pos = child, pos + matched
            if inside:
                break
        return path, pos, None

    def match_tiers(self, token_ids: Sequence[int]) -> TierMatch:
        """Where the longest cached prefix of `token_ids` lives: the device prefix and what is below."""
        tokens = token_ids if isinstance(token_ids, list) else list(token_ids)
        path, _, blocked = self._walk_path(tokens, hit=True)
        i = 0
        while i < len(path) and path[i].value is not None:
            i += 1
        device_path, lower = path[:i], path[i:]
        values = [n.value for n in device_path]
        prefix_len = sum(v.numel() for v in values)
        self.stats.record_lookup(requested_len=len(tokens), prefix_len=prefix_len)
        prefetch_hit = False
        for node in device_path:
            if node.prefetched:
                node.prefetched, prefetch_hit = False, True
            if (self.write_policy == "write_through_selective" and node.host_value is None and node.storage is None
                    and node.hit_count >= SELECTIVE_HIT_THRESHOLD):
                self._backup(node)
        loading = next((n.loading for n in lower if n.loading is not None), None)
        if loading is None and blocked is not None and not lower:
            loading = blocked.loading
        slot_ids = empty_slots() if not values else values[0] if len(values) == 1 else torch.cat(values)
        device = MatchResult(slot_ids, device_path[-1] if device_path else self.root)
        if loading is not None:
            return TierMatch(device, [], 0, loading, prefetch_hit)
        return TierMatch(device, lower, sum(len(n.key) for n in lower), None, prefetch_hit)

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        return self.match_tiers(token_ids).device

    def insert(self, token_ids: Sequence[int], slot_ids: torch.Tensor) -> InsertResult:
        """As the plain cache; nodes found off the device take the caller's slots (the caller just
        computed that KV), so only the device-resident prefix is reported as already cached."""
        tokens = token_ids if isinstance(token_ids, list) else list(token_ids)
        assert slot_ids.dim() == 1 and slot_ids.numel() == len(tokens)
        path, pos, blocked = self._walk_path(tokens, hit=False)
        already = 0
        i = 0
        while i < len(path) and path[i].value is not None:
            already += len(path[i].key)
            i += 1
        cached = already
        for node in path[i:]:
            if node.loading is not None:  # its slots are on their way; the caller keeps its own
                return InsertResult(already, cached)
            assert node.lock_ref == 0, "a node off the device is locked only by its load"
            self._set_device(node, stored_copy(slot_ids[cached : cached + len(node.key)]))
            cached += len(node.key)
        if blocked is not None:
            return InsertResult(already, cached)
        if pos < len(tokens):
            leaf = self._new_leaf(path[-1] if path else self.root, tokens[pos:], stored_copy(slot_ids[pos:]))
            if self.write_policy == "write_through":
                self._backup(leaf)
        return InsertResult(already, len(tokens))

    # --- moving between tiers ------------------------------------------------------------------

    def _backup(self, node: TierNode, *, leaving: bool = False) -> bool:
        """Copy a device node to the host (making room there); False if the host cannot take it,
        or (under `workflow`) if everything it would displace is worth more than the copy: needed
        sooner than the node if it is `leaving` the device, anything but other copies of
        device-resident nodes if it stays (written through)."""
        if self.host is None:
            return False
        n = len(node.key)
        host_slots = self.host.allocator.alloc(n)
        if host_slots is None:
            need = n - self.host.allocator.num_free_slots
            below = None
            # (with a file tier below, host eviction spills to files instead: nothing to weigh)
            if self.eviction_policy == "workflow" and not node.children and self.storage is None:
                below = self._priority(node, self.workflows) if leaving else self._host_key(node)
                if self._host_freeable(below) < need:
                    self.tier_stats.backups_skipped_tokens += n
                    return False
            self._evict_host(need, below=below)
            host_slots = self.host.allocator.alloc(n)
        if host_slots is None:
            return False
        self.host.backup(node.value, host_slots)
        node.host_value = host_slots
        self._host_size += n
        self.tier_stats.backup_tokens += n
        self.tier_stats.bytes_to_host += n * self.host.bytes_per_token
        return True

    def _host_key(self, node: TierNode):
        """Host eviction order. Under `workflow`, a host copy of a node still on the device goes
        first: it is read only if the device evicts the node before its next step, and the device
        keeps the nodes needed soonest (one that is evicted later is backed up again then). The host
        tier then holds other nodes than the device does when it is short of room."""
        key = self._priority(node, self.workflows)
        if self.eviction_policy == "workflow" and node.value is not None:
            return (float("-inf"), key[1])
        return key

    def _host_freeable(self, below) -> int:
        """Host tokens that eviction would free before reaching a node of key `below`."""
        return sum(len(n.key) for n in self._nodes() if self._host_evictable(n) and self._host_key(n) < below)

    def device_freeable(self, below: tuple) -> int:
        """Device tokens that eviction would free before reaching a node of key `below` (at most:
        a parent is counted though its own key may be the higher)."""
        return sum(len(n.key) for n in self._nodes()
                   if n.value is not None and n.lock_ref == 0 and n.loading is None
                   and self._priority(n, self.workflows) < below)

    def _is_device_leaf(self, node: TierNode) -> bool:
        return (node.value is not None and node.lock_ref == 0 and node.loading is None
                and not any(c.value is not None for c in node.children.values()))

    def evict(self, num_tokens: int, *, below: tuple | None = None) -> int:
        """Free at least `num_tokens` device slots in policy order (fewer if not enough are
        evictable, or if `below` is given and the next candidate's key is not below it)."""
        heap = [(self._priority(n, self.workflows), n.id, n) for n in self._nodes() if self._is_device_leaf(n)]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and heap:
            key, _, node = heap[0]
            if below is not None and key >= below:
                break
            heapq.heappop(heap)
            parent = node.parent
            freed.append(node.value)
            num_freed += len(node.key)
            self._evict_device(node)
            if parent is not self.root and self._is_device_leaf(parent):
                heapq.heappush(heap, (self._priority(parent, self.workflows), parent.id, parent))
        if freed:
            self.allocator.free(torch.cat(freed))
        self.stats.evicted_tokens += num_freed
        by_policy = self.tier_stats.evictions_by_policy
        by_policy[self.eviction_policy] = by_policy.get(self.eviction_policy, 0) + num_freed
        return num_freed

    def _evict_device(self, node: TierNode) -> None:
        """Take an unlocked device leaf off the device (the caller frees its slots)."""
        n = len(node.key)
        kept = node.host_value is not None or node.storage is not None
        # Under `workflow` a node whose host copy made room for others is written back now (unless
        # everything on the host is needed sooner).
        if not kept and (self.write_policy == "write_back" or node.children or self.eviction_policy == "workflow"):
            kept = self._backup(node, leaving=True)
        self._evictable_size -= n
        if node.prefetched:
            self.tier_stats.prefetch_unused_tokens += n
            node.prefetched = False
        if kept:
            node.value = None
            self.tier_stats.device_evicted_tokens += n
        else:
            node.value = None
            self.tier_stats.dropped_tokens += n
            self._remove_subtree(node)

    def _remove_subtree(self, node: TierNode) -> None:
        """Delete `node` and everything under it (all off the device, none locked)."""
        del node.parent.children[node.key[0]]
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            assert n.value is None and n.lock_ref == 0 and n.loading is None
            if n is not node:
                self.tier_stats.dropped_tokens += len(n.key)
            self._drop_host(n)
            self._drop_storage(n)
            n.in_tree = False
            self._num_nodes -= 1

    def _drop_host(self, node: TierNode) -> None:
        if node.host_value is not None:
            self.host.allocator.free(node.host_value)
            self._host_size -= len(node.key)
            node.host_value = None

    def _drop_storage(self, node: TierNode) -> None:
        if node.storage is not None:
            self.storage.drop_ref(node.storage)
            node.storage = None

    def _host_evictable(self, node: TierNode) -> bool:
        # A locked node's host copy may go while the node is on the device (the request reads that).
        return (node.host_value is not None and node.loading is None
                and (node.value is not None or (node.lock_ref == 0 and (
                    node.storage is not None or self.storage is not None or not node.children))))

    def _evict_host(self, num_tokens: int, *, below=None) -> int:
        """Free at least `num_tokens` host slots (fewer if not enough can go, or if `below` is given
        and the next candidate's key is not below it), in policy order."""
        heap = [(self._host_key(n), n.id, n) for n in self._nodes() if self._host_evictable(n)]
        heapq.heapify(heap)
        num_freed = 0
        while num_freed < num_tokens and heap:
            if below is not None and heap[0][0] >= below:
                break
            _, _, node = heapq.heappop(heap)
            if not node.in_tree or not self._host_evictable(node):
                continue
            n = len(node.key)
            parent = node.parent
            if node.value is None and node.storage is None and self.storage is not None:
                rows = self.host.read(node.host_value)
                node.storage = self.storage.write(rows)
                self.tier_stats.storage_write_tokens += n
                self.tier_stats.bytes_to_storage += rows.nbytes
            if node.value is not None or node.storage is not None:
                self._drop_host(node)
            else:
                self.tier_stats.dropped_tokens += n
                self._remove_subtree(node)
                if parent is not self.root and self._host_evictable(parent):
                    heapq.heappush(heap, (self._host_key(parent), parent.id, parent))
            num_freed += n
            self.tier_stats.host_evicted_tokens += n
        return num_freed

    # --- workflows -----------------------------------------------------------------------------

    def tag(self, token_ids: Sequence[int], workflow_id: str, agent: str) -> None:
        """Mark the nodes along `token_ids` as used by `agent` of `workflow_id`, and remember the
        deepest one as that agent's context (what a prefetch brings back)."""
        tokens = token_ids if isinstance(token_ids, list) else list(token_ids)
        tag = (workflow_id, agent)
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None or common_prefix_len(child.key, tokens, pos) < len(child.key):
                break
            if child.tags is None:
                child.tags = set()
            child.tags.add(tag)
            if len(child.tags) > MAX_TAGS_PER_NODE:
                child.tags = {t for t in child.tags if self.workflows.is_live(t[0])}
            node, pos = child, pos + len(child.key)
        if node is not self.root:
            self.workflows.remember_node(workflow_id, agent, node)

    def prefetch(self, workflow_id: str, *, budget: int | None = None) -> list[LoadJob]:
        """Start loading the contexts of the agents of the workflow's next step that are off the
        device, using free slots and those of nodes needed later than that step, at most `budget`
        slots in all (see `prefetch.py`)."""
        return prefetch_next_step(self, workflow_id, budget=budget)

    # --- reset, integrity, report ------------------------------------------------------------

    def reset(self) -> None:
        self.loads.cancel_all()
        assert self._protected_size == 0, "reset (flush_cache) while requests hold cache locks"
        values = [n.value for n in self._nodes() if n.value is not None]
        for n in list(self._nodes()):
            self._drop_host(n)
            self._drop_storage(n)
            n.in_tree = False
        if values:
            self.allocator.free(torch.cat(values))
        self.workflows.reset()
        self._init_tree()

    def close(self) -> None:
        self.loads.cancel_all()
        if self.loader is not None:
            self.loader.close()
        if self.storage is not None:
            self.storage.close()

    def assert_integrity(self, *, privately_owned: int = 0) -> None:
        root = self.root
        assert not root.key and root.parent is None and root.lock_ref == 0 and root.value.numel() == 0
        evictable = protected = host = num_nodes = 0
        device_values: list[torch.Tensor] = []
        host_values: list[torch.Tensor] = []
        storage_refs: dict[str, int] = {}
        jobs = {id(j) for j in self.loads.jobs}
        for node in self._nodes():
            num_nodes += 1
            n = len(node.key)
            assert node.in_tree and node.key, f"{node}: removed or empty node in the tree"
            assert node.parent is not None and node.parent.children.get(node.key[0]) is node
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()) >= 0, f"{node}: lock_ref"
            assert node.value is not None or node.host_value is not None or node.storage is not None, \
                f"{node}: in no tier"
            if node.value is not None:
                assert node.parent is root or node.parent.value is not None, f"{node}: on the device below a node off it"
                assert node.value.dtype == torch.int64 and node.value.numel() == n
                assert node.loading is None
                if node.lock_ref > 0:
                    protected += n
                else:
                    evictable += n
                device_values.append(node.value)
            if node.host_value is not None:
                assert self.host is not None and node.host_value.numel() == n
                host += n
                host_values.append(node.host_value)
            if node.storage is not None:
                assert self.storage is not None and node.storage.length == n
                storage_refs[node.storage.path] = storage_refs.get(node.storage.path, 0) + 1
            if node.loading is not None:
                assert id(node.loading) in jobs and node.lock_ref > 0, f"{node}: loading without a live, locking job"
        assert num_nodes == self._num_nodes, "node count drifted"
        assert evictable == self._evictable_size, f"evictable_size {self._evictable_size} != {evictable}"
        assert protected == self._protected_size, f"protected_size {self._protected_size} != {protected}"
        in_flight = [seg.device_slots.cpu() for job in self.loads.jobs for seg in job.segments]
        self._assert_slot_accounting(torch.cat(device_values) if device_values else empty_slots(),
                                     privately_owned + sum(s.numel() for s in in_flight))
        if in_flight:
            everything = torch.cat([self.allocator.free_slots().cpu(), *device_values, *in_flight])
            assert torch.unique(everything).numel() == everything.numel(), "a loading slot is also free or cached"
        assert host == self._host_size, f"host_size {self._host_size} != {host}"
        if self.host is not None:
            free = self.host.allocator.free_slots()
            assert free.numel() + host == self.host.num_slots, "host slot leak"
            both = torch.cat([free, *host_values])
            assert torch.unique(both).numel() == both.numel(), "a host slot is held twice, or held and free"
        if self.storage is not None:
            assert storage_refs == self.storage._refs, "file references drifted"

    def tier_info(self) -> dict:
        """Settings, sizes and counters, for the server info and /metrics."""
        stats = self.tier_stats.flat()
        return {
            "hierarchical": self.host is not None,
            "write_policy": self.write_policy,
            "eviction_policy": self.eviction_policy,
            "prefetch": self.prefetch_enabled,
            "storage_backend": self.storage.name if self.storage is not None else None,
            "host_slots": self.host.num_slots if self.host is not None else 0,
            "host_tokens": self._host_size,
            "storage_files": self.storage.num_files if self.storage is not None else 0,
            "storage_bytes": self.storage.bytes_stored if self.storage is not None else 0,
            "loads_in_flight": len(self.loads.jobs),
            "workflows": len(self.workflows),
            **stats,
        }


def build_hiradix_cache(
    allocator: SlotAllocator,
    kv_pool,
    *,
    enable_hierarchical_cache: bool,
    hicache_ratio: float,
    hicache_size: float,
    hicache_write_policy: str,
    hicache_storage_backend: str | None,
    hicache_storage_dir: str | None,
    radix_eviction_policy: str,
    prefetch: bool,
) -> HiRadixCache:
    """The cache the flags describe: host pool `hicache_size` GB, or `hicache_ratio` x the device
    pool's tokens; a file tier when a storage backend is named."""
    from plait.runtime.memory.host_pool import STORAGE_BACKENDS

    host = storage = None
    if enable_hierarchical_cache:
        if hicache_size and hicache_size > 0:
            probe_bytes = kv_pool.num_layers * 2 * kv_pool.k_buffers[0][0].numel() * kv_pool.k_buffers[0].element_size()
            num_host_slots = int(hicache_size * 2**30 // probe_bytes)
        else:
            if hicache_ratio <= 0:
                raise ValueError("--hicache-ratio must be positive")
            num_host_slots = int(kv_pool.num_slots * hicache_ratio)
        host = HostKVPool(kv_pool, max(num_host_slots, 1))
        if hicache_storage_backend:
            if hicache_storage_backend not in STORAGE_BACKENDS:
                raise ValueError(f"unknown hicache storage backend {hicache_storage_backend!r}; "
                                 f"choose from {', '.join(STORAGE_BACKENDS)}")
            storage = STORAGE_BACKENDS[hicache_storage_backend](hicache_storage_dir)
    elif hicache_storage_backend:
        raise ValueError("--hicache-storage-backend needs --enable-hierarchical-cache")
    return HiRadixCache(allocator, host=host, storage=storage, write_policy=hicache_write_policy,
                        eviction_policy=radix_eviction_policy, prefetch=prefetch)
