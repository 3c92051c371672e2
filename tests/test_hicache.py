"""The tiered radix cache (device, host, file) against an oracle, its eviction orders, its loads and
prefetches, and steps-to-execution on example step graphs."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from plait.runtime.cache.base import cache_finished
from plait.runtime.cache.eviction import EVICTION_POLICIES
from plait.runtime.cache.hiradix_cache import HiRadixCache
from plait.runtime.cache.workflow import StepGraph, WorkflowTracker
from plait.runtime.memory.host_pool import FileStorage, HostKVPool
from plait.runtime.memory.kv_pool import KVPool, SlotAllocator

NUM_LAYERS = 2


def make_cache(*, device_slots: int = 48, host_slots: int | None = 1000, storage: bool = False,
               write_policy: str = "write_through", eviction: str = "lru", prefetch: bool = False,
               background: bool = False, tmp_path=None) -> tuple[HiRadixCache, KVPool]:
    pool = KVPool(num_slots=device_slots, num_layers=NUM_LAYERS, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    allocator = SlotAllocator(device_slots)
    host = HostKVPool(pool, host_slots) if host_slots else None
    store = FileStorage(str(tmp_path) if tmp_path is not None else None) if storage else None
    cache = HiRadixCache(allocator, host=host, storage=store, write_policy=write_policy, eviction_policy=eviction,
                         prefetch=prefetch, background_loads=background)
    cache.kv_pool = pool  # for the helpers below
    return cache, pool


def code(prefix: list[int], layer: int) -> float:
    """The KV a token "computes": a function of its whole prefix, so a wrong slot shows."""
    return float(hash(tuple(prefix)) % 100_003 + layer * 0.5)


def cache_seq(cache: HiRadixCache, tokens: list[int]) -> bool:
    """Run `tokens` through the cache as the scheduler does: load what is below the device, compute
    (write the codes of) the rest, hand it to the cache. False if the device had no room."""
    found = cache.match_tiers(tokens)
    if found.lower_nodes:
        job = cache.loads.start(found.lower_nodes)
        if job is not None:
            job.done.wait()
            cache.loads.poll()
    match = cache.match_prefix(tokens)
    cache.lock(match.last_node)
    prefix_len = match.slot_ids.numel()
    num_new = len(tokens) - prefix_len
    slots = cache.allocator.alloc(num_new)
    if slots is None:
        cache.evict(num_new - cache.allocator.num_free_slots)
        slots = cache.allocator.alloc(num_new)
    if slots is None:
        cache.unlock(match.last_node)
        return False
    pool = cache.kv_pool
    for i, slot in enumerate(slots.tolist()):
        for layer in range(NUM_LAYERS):
            pool.k_buffers[layer][slot] = code(tokens[: prefix_len + i + 1], layer)
            pool.v_buffers[layer][slot] = -code(tokens[: prefix_len + i + 1], layer)
    cache_finished(cache, cache.allocator, tokens, torch.cat([match.slot_ids, slots]), prefix_len, match.last_node)
    return True


def check_device_kv(cache: HiRadixCache, tokens: list[int]) -> int:
    """The device part of the match holds exactly the KV computed for those tokens."""
    slots = cache.match_prefix(tokens).slot_ids.tolist()
    pool = cache.kv_pool
    for i, slot in enumerate(slots):
        for layer in range(NUM_LAYERS):
            assert float(pool.k_buffers[layer][slot, 0, 0]) == code(tokens[: i + 1], layer)
            assert float(pool.v_buffers[layer][slot, 0, 0]) == -code(tokens[: i + 1], layer)
    return len(slots)


def oracle_len(inserted: list[list[int]], tokens: list[int]) -> int:
    best = 0
    for seq in inserted:
        n = 0
        while n < min(len(seq), len(tokens)) and seq[n] == tokens[n]:
            n += 1
        best = max(best, n)
    return best


# --- property test against the oracle ------------------------------------------------------------


@pytest.mark.parametrize("write_policy,storage,host_slots,lossless", [
    ("write_through", False, 1000, True),
    ("write_back", False, 1000, True),
    ("write_through_selective", False, 1000, False),  # cold nodes are dropped when evicted
    ("write_back", True, 40, True),  # a small host spills to files
    ("write_through", False, 40, False),  # a small host with nothing below drops
])
@pytest.mark.parametrize("eviction", ["lru", "lfu", "workflow"])
def test_tiers_against_an_oracle(write_policy, storage, host_slots, lossless, eviction, tmp_path):
    """Random sequences over a 3-token alphabet (much sharing) through a 48-slot device pool: after
    every operation the integrity check holds on every tier, the device KV is the computed one,
    nothing is found that was never inserted, and with room below nothing inserted is lost."""
    for seed in range(3):
        rng = random.Random(seed)
        cache, _ = make_cache(write_policy=write_policy, storage=storage, host_slots=host_slots, eviction=eviction,
                              tmp_path=tmp_path / f"{seed}" if storage else None)
        workflows = cache.workflows
        workflows.publish("w", StepGraph.from_dicts([{"id": "a", "agents": ["a"], "next": ["b"]},
                                                      {"id": "b", "agents": ["b"], "next": ["a"]}]), "a")
        inserted: list[list[int]] = []
        for _ in range(60):
            op = rng.random()
            if op < 0.55:
                tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 24))]
                if cache_seq(cache, tokens):
                    inserted.append(tokens)
                    if rng.random() < 0.5:
                        cache.tag(tokens, "w", rng.choice("ab"))
            elif op < 0.75:
                cache.evict(rng.randrange(1, 30))
            elif op < 0.85 and cache.host is not None and (storage or not lossless):
                cache._evict_host(rng.randrange(1, 20))
            elif op < 0.9:
                workflows.on_agent("w", rng.choice("ab"))
            query = [rng.randrange(3) for _ in range(rng.randrange(1, 24))]
            if rng.random() < 0.5 and inserted:
                query = list(rng.choice(inserted))
            found = cache.match_tiers(query)
            cache.assert_integrity()
            device_len = check_device_kv(cache, query)
            assert device_len == found.device.slot_ids.numel()
            total = device_len + found.lower_len
            expected = oracle_len(inserted, query)
            assert total <= expected
            if lossless:
                assert total == expected, f"lost KV: found {total} of {expected} tokens"
        # and everything found below comes back with the right KV
        for tokens in inserted[-5:]:
            cache_seq(cache, tokens)
            check_device_kv(cache, tokens)
            cache.assert_integrity()
        cache.reset()
        cache.assert_integrity()
        assert cache.allocator.num_free_slots == cache.allocator.num_slots
        if cache.host is not None:
            assert cache.host.allocator.num_free_slots == cache.host.num_slots
        if cache.storage is not None:
            assert cache.storage.num_files == 0
        cache.close()


# --- write policies --------------------------------------------------------------------------------


def test_write_policies_copy_at_their_moment():
    seq = list(range(10))
    through, _ = make_cache(write_policy="write_through")
    cache_seq(through, seq)
    assert through.host_size == 10  # copied when cached

    back, _ = make_cache(write_policy="write_back")
    cache_seq(back, seq)
    assert back.host_size == 0
    back.evict(10)
    assert back.host_size == 10 and back.match_tiers(seq).lower_len == 10  # copied when evicted

    selective, _ = make_cache(write_policy="write_through_selective")
    cache_seq(selective, seq)
    assert selective.host_size == 0
    selective.match_prefix(seq)
    assert selective.host_size == 0  # one hit: not yet
    selective.match_prefix(seq)
    assert selective.host_size == 10  # hot after its second hit
    for cache in (through, back, selective):
        cache.assert_integrity()


def test_without_a_copy_below_eviction_drops():
    cache, _ = make_cache(host_slots=None)
    cache_seq(cache, list(range(10)))
    cache.evict(10)
    found = cache.match_tiers(list(range(10)))
    assert found.device.slot_ids.numel() == 0 and found.lower_len == 0
    assert cache.tier_stats.dropped_tokens == 10
    cache.assert_integrity()


def test_file_tier_takes_what_the_host_cannot_hold(tmp_path):
    cache, _ = make_cache(device_slots=16, host_slots=16, storage=True, write_policy="write_back", tmp_path=tmp_path)
    seqs = [[i] * 12 for i in range(1, 5)]
    for seq in seqs:
        assert cache_seq(cache, seq)
    assert cache.tier_stats.storage_write_tokens > 0 and cache.storage.num_files > 0
    for seq in seqs:  # each comes back, from the host or from a file, with its KV
        assert cache_seq(cache, seq)
        assert check_device_kv(cache, seq) == 12
        cache.assert_integrity()
    assert cache.tier_stats.storage_hit_tokens > 0
    cache.close()


# --- steps-to-execution --------------------------------------------------------------------------------


def graph(*steps: tuple[str, list[str], list[str]]) -> StepGraph:
    return StepGraph.from_dicts([{"id": i, "agents": a, "next": n} for i, a, n in steps])


def test_steps_to_execution_on_a_chain():
    chain = graph(("s0", ["a"], ["s1"]), ("s1", ["b"], ["s2"]), ("s2", ["c"], []))
    assert chain.distances(["s0"]) == {"a": 0, "b": 1, "c": 2}
    assert chain.distances(["s1"]) == {"b": 0, "c": 1}  # a does not run again


def test_steps_to_execution_on_a_fan_out():
    fan = graph(("plan", ["planner"], ["work"]), ("work", ["coder", "tester"], ["review"]),
                ("review", ["reviewer"], ["plan"]))
    assert fan.distances(["plan"]) == {"planner": 0, "coder": 1, "tester": 1, "reviewer": 2}
    assert fan.distances(["review"]) == {"reviewer": 0, "planner": 1, "coder": 2, "tester": 2}


def test_steps_to_execution_on_cycles_and_the_nearest_occurrence():
    cyc = graph(("s0", ["a"], ["s1"]), ("s1", ["b"], ["s2", "s0"]), ("s2", ["a", "c"], ["s0"]))
    assert cyc.distances(["s0"]) == {"a": 0, "b": 1, "c": 2}
    # from s1: a at distance 1 (back to s0) though s2 also has it, c at 1; each step is visited once
    assert cyc.distances(["s1"]) == {"b": 0, "a": 1, "c": 1}
    with pytest.raises(ValueError, match="not a step"):
        graph(("s0", ["a"], ["nowhere"]))


def test_the_tracker_follows_requests_and_learns_a_graph():
    tracker = WorkflowTracker()
    tracker.publish("w", graph(("s0", ["a"], ["s1"]), ("s1", ["b"], ["s0"])), current_step="s0")
    assert tracker.steps_to_execution("w", "b") == 1 and tracker.steps_to_execution("w", "a") == 0
    tracker.on_agent("w", "b")
    assert tracker.steps_to_execution("w", "a") == 1 and tracker.next_agents("w") == ["a"]
    tracker.on_agent("w", "a")
    assert tracker.steps_to_execution("w", "b") == 1
    assert tracker.tags_steps([("w", "a"), ("w", "b")]) == 0  # shared: the minimum
    assert tracker.tags_steps([("gone", "a")]) == float("inf")
    # No graph published: one step per agent, edges from the order seen
    for agent in ["x", "y", "z", "x"]:
        tracker.on_agent("v", agent)
    assert tracker.steps_to_execution("v", "y") == 1 and tracker.steps_to_execution("v", "z") == 2
    tracker.on_agent("u", "y")  # a second workflow of the same program shares what was learned
    assert tracker.next_agents("u") == ["z"]


# --- eviction order --------------------------------------------------------------------------------


def test_lru_and_lfu_orders():
    assert set(EVICTION_POLICIES) == {"lru", "lfu", "workflow"}
    a, b, c = [1] * 10, [2] * 10, [3] * 10
    lru, _ = make_cache(device_slots=30)
    for seq in (a, b, c):
        cache_seq(lru, seq)
    lru.match_prefix(a)  # a is now the most recently used
    lru.evict(10)
    assert lru.match_prefix(b).slot_ids.numel() == 0 and lru.match_prefix(a).slot_ids.numel() == 10
    lfu, _ = make_cache(device_slots=30, eviction="lfu")
    for seq in (a, b, c):
        cache_seq(lfu, seq)
    for _ in range(3):
        lfu.match_prefix(b)
    lfu.match_prefix(a)
    lfu.evict(10)  # c: fewest hits
    assert lfu.match_prefix(c).slot_ids.numel() == 0 and lfu.match_prefix(a).slot_ids.numel() == 10


def test_workflow_order_is_largest_steps_first_shared_prefixes_take_the_minimum():
    cache, _ = make_cache(device_slots=60, eviction="workflow")
    shared = [9] * 10
    seqs = {"a": shared + [1] * 10, "b": shared + [2] * 10, "c": [3] * 10, "none": [4] * 10}
    cache.workflows.publish("w", graph(("s0", ["a"], ["s1"]), ("s1", ["b"], ["s2"]), ("s2", ["c"], ["s0"])), "s2")
    for agent, seq in seqs.items():
        cache_seq(cache, seq)
        if agent != "none":
            cache.tag(seq, "w", agent)
    cache.match_prefix(seqs["none"])  # recently used: LRU would keep it
    # at s2: c runs now (0), a in 1 step, b in 2; the untagged one is needed by no one (inf)
    def on_device() -> dict[str, int]:
        return {k: cache.match_prefix(seq).slot_ids.numel() for k, seq in seqs.items()}

    expected = [
        {"a": 20, "b": 20, "c": 10, "none": 0},
        {"a": 20, "b": 10, "c": 10, "none": 0},  # b's own part (2 steps away)
        {"a": 10, "b": 10, "c": 10, "none": 0},  # a's own part (1 step)
        {"a": 0, "b": 0, "c": 10, "none": 0},  # the shared prefix (min(1, 2) = 1 step) ...
        {"a": 0, "b": 0, "c": 0, "none": 0},  # ... before the running agent's (0)
    ]
    for state in expected:
        cache.evict(1)
        assert on_device() == state
    shared_node = cache.match_tiers(shared).lower_nodes[0]
    assert cache.workflows.tags_steps(shared_node.tags) == 1
    cache.assert_integrity()


def run_cycle(eviction: str, rounds: int = 3) -> tuple[HiRadixCache, int]:
    """Four agents of 10 tokens in a cycle, a device pool of 2 agents and a host tier of 3: the
    prompt tokens found in some tier over the rounds after the first."""
    cache, _ = make_cache(device_slots=20, host_slots=30, eviction=eviction)
    agents = {name: [i + 1] * 10 for i, name in enumerate("abcd")}
    cache.workflows.publish("w", graph(*((f"s{i}", [n], [f"s{(i + 1) % 4}"]) for i, n in enumerate("abcd"))), "s0")
    found = 0
    for r in range(rounds):
        for name, seq in agents.items():
            cache.workflows.on_agent("w", name)
            match = cache.match_tiers(seq)
            if r > 0:
                found += match.device.slot_ids.numel() + match.lower_len
            assert cache_seq(cache, seq)
            cache.tag(seq, "w", name)
            check_device_kv(cache, seq)
            cache.assert_integrity()
    return cache, found


def test_workflow_tiers_keep_a_cycle_that_lru_thrashes():
    # LRU over inclusive tiers (the host holds copies of what the device holds) drops each agent
    # just before it runs again; under `workflow` the host drops copies of device-resident nodes
    # first and skips backing up an agent needed later than all it holds, so the two tiers hold
    # four different agents between them.
    _, lru_found = run_cycle("lru")
    cache, wf_found = run_cycle("workflow")
    assert lru_found == 0
    assert wf_found == 2 * 4 * 10  # every agent, every later round
    assert cache.tier_stats.host_evicted_tokens > 0


def test_workflow_backup_is_skipped_when_the_host_holds_only_sooner_needs():
    cache, _ = make_cache(device_slots=10, host_slots=20, eviction="workflow")
    a, b, c = [1] * 10, [2] * 10, [3] * 10
    cache.workflows.publish("w", graph(("s0", ["a"], ["s1"]), ("s1", ["b"], ["s2"]), ("s2", ["c"], ["s0"])), "s0")
    for name, seq in (("b", b), ("c", c)):
        cache_seq(cache, seq)
        cache.tag(seq, "w", name)
    # b and c are on the host (c on the device too); at s0, a runs: b is 1 step away, c 2 ...
    cache.workflows.on_agent("w", "a")
    assert cache.match_tiers(b).lower_len == 10
    cache_seq(cache, a)  # ... a's copy makes room by dropping c's host copy (c stays on the device)
    cache.tag(a, "w", "a")
    assert cache.match_tiers(c).device.slot_ids.numel() == 0 or cache.match_tiers(c).lower_len == 0
    cache.workflows.on_agent("w", "b")  # now a (just run) is 2 steps away and c 1: b loads, a ...
    assert cache_seq(cache, b)
    # ... is not written over c: the host keeps b and c, a (needed last) is dropped
    assert cache.match_tiers(c).lower_len + cache.match_tiers(c).device.slot_ids.numel() == 10
    assert cache.match_tiers(a).lower_len + cache.match_tiers(a).device.slot_ids.numel() == 0
    assert cache.tier_stats.backups_skipped_tokens >= 10
    cache.assert_integrity()


# --- loads and prefetch ------------------------------------------------------------------------


def test_prefetch_loads_the_next_agents_context_and_counts_the_hit():
    cache, _ = make_cache(device_slots=40, eviction="workflow", prefetch=True)
    a, b = [1] * 12, [2] * 12
    cache.workflows.publish("w", graph(("s0", ["a"], ["s1"]), ("s1", ["b"], ["s0"])), "s1")
    for agent, seq in (("a", a), ("b", b)):
        cache_seq(cache, seq)
        cache.tag(seq, "w", agent)
    cache.evict(100)
    assert cache.match_prefix(b).slot_ids.numel() == 0
    cache.workflows.on_agent("w", "a")  # a runs: b is next
    jobs = cache.prefetch("w")
    assert len(jobs) == 1
    cache.loads.wait()
    found = cache.match_tiers(b)
    assert found.device.slot_ids.numel() == 12 and found.prefetch_hit
    check_device_kv(cache, b)
    assert cache.tier_stats.prefetch_tokens == 12
    cache.assert_integrity()


def test_a_prefetch_that_cannot_fit_whole_evicts_nothing():
    cache, _ = make_cache(device_slots=30, eviction="workflow", prefetch=True)
    a, b, d = [1] * 12, [2] * 12, [4] * 20
    cache.workflows.publish("w", graph(*((f"s{i}", [n], [f"s{(i + 1) % 4}"]) for i, n in enumerate("abcd"))), "s0")
    cache_seq(cache, d)
    cache.tag(d, "w", "d")
    cache.evict(100)  # d on the host only
    for agent, seq in (("a", a), ("b", b)):
        cache_seq(cache, seq)
        cache.tag(seq, "w", agent)
    running = cache.match_prefix(a).last_node
    cache.lock(running)  # a's request holds it: 6 free slots, b's 12 evictable, d needs 20
    cache.workflows.on_agent("w", "c")  # d is next, a 2 steps away, b 3
    evicted_before = cache.tier_stats.device_evicted_tokens + cache.tier_stats.dropped_tokens
    assert cache.prefetch("w") == []
    assert cache.match_prefix(b).slot_ids.numel() == 12  # b was not evicted for a load that could not start
    assert cache.tier_stats.device_evicted_tokens + cache.tier_stats.dropped_tokens == evicted_before
    cache.assert_integrity()
    cache.unlock(running)  # now a (2 steps) and b (3) may make room for d (1)
    (job,) = cache.prefetch("w")
    cache.loads.wait()
    assert cache.match_tiers(d).device.slot_ids.numel() == 20
    check_device_kv(cache, d)
    cache.assert_integrity()


def test_a_prefetch_leaves_room_for_the_current_steps_contexts_of_other_workflows():
    # Two workflows over the same four agents; w2 is at a, whose context is on the host, and w1 at
    # c, before d. The pool (30) cannot hold a and d (20 each): prefetching d would be undone by a's
    # own load, which evicts d (1 step away) to make room for a (0).
    cache, _ = make_cache(device_slots=30, eviction="workflow", prefetch=True)
    seqs = {n: [i + 1] * 20 for i, n in enumerate("abcd")}
    cycle = graph(*((f"s{i}", [n], [f"s{(i + 1) % 4}"]) for i, n in enumerate("abcd")))
    for w in ("w1", "w2"):
        cache.workflows.publish(w, cycle, "s0")
    for name in ("a", "d"):
        cache_seq(cache, seqs[name])
        cache.tag(seqs[name], "w1", name)
        cache.evict(100)
    cache.workflows.on_agent("w2", "a")
    cache.workflows.on_agent("w1", "c")
    assert cache.prefetch("w1") == []
    assert cache.tier_stats.prefetch_skipped == 1
    assert cache_seq(cache, seqs["a"])  # w2's request loads a
    cache.workflows.on_agent("w2", "b")  # w2 moves on: a is no longer needed now, d may come
    (job,) = cache.prefetch("w1")
    cache.loads.wait()
    assert cache.match_tiers(seqs["d"]).device.slot_ids.numel() == 20
    cache.assert_integrity()


def test_a_load_cancelled_in_flight_gives_everything_back():
    cache, _ = make_cache(device_slots=40, background=True)
    seq = list(range(20))
    cache_seq(cache, seq)
    cache.evict(100)
    free_before = cache.allocator.num_free_slots
    cache.loader.gate = threading.Event()  # hold the worker
    found = cache.match_tiers(seq)
    job = cache.loads.start(found.lower_nodes)
    job.waiters += 1
    cache.assert_integrity()  # the job's slots are accounted as in flight
    assert cache.allocator.num_free_slots == free_before - 20
    assert cache.match_tiers(seq).loading is job  # a second request would wait for it
    cache.loads.release_waiter(job)  # its only request aborted
    assert job.cancelled
    cache.loader.gate.set()
    cache.loads.wait(timeout=10)
    assert job.finished and cache.tier_stats.loads_cancelled == 1
    assert cache.allocator.num_free_slots == free_before
    found = cache.match_tiers(seq)
    assert found.device.slot_ids.numel() == 0 and found.lower_len == 20  # still on the host
    cache.assert_integrity()
    cache.close()


def test_a_prefetch_stops_when_its_workflow_is_aborted():
    cache, _ = make_cache(device_slots=40, eviction="workflow", prefetch=True, background=True)
    a, b = [1] * 12, [2] * 12
    cache.workflows.publish("w", graph(("s0", ["a"], ["s1"]), ("s1", ["b"], ["s0"])), "s1")
    for agent, seq in (("a", a), ("b", b)):
        cache_seq(cache, seq)
        cache.tag(seq, "w", agent)
    cache.evict(100)
    free_before = cache.allocator.num_free_slots
    cache.loader.gate = threading.Event()
    cache.workflows.on_agent("w", "a")
    (job,) = cache.prefetch("w")
    assert cache.loads.cancel_prefetches("other") == 0 and not job.cancelled
    assert cache.loads.cancel_prefetches("w") == 1
    cache.loader.gate.set()
    cache.loads.wait(timeout=10)
    assert job.finished and cache.tier_stats.loads_cancelled == 1
    assert cache.allocator.num_free_slots == free_before
    assert cache.match_tiers(b).lower_len == 12
    cache.assert_integrity()
    cache.close()
