"""The router: its approximate prefix tree against a naive oracle (property tests), routing decisions
on crafted traces (affinity, the load-imbalance override, a failing worker leaving and coming back),
and the HTTP relay with a retry when a worker cannot be reached."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from plait.router.config import RouterConfig
from plait.router.core import Router
from plait.router.policy import CacheAware, CacheAwareConfig, PowerOfTwo, RoundRobin, WorkerLoad
from plait.router.tree import ApproxRadixTree, token_key

TENANTS = ["a", "b", "c"]
texts = st.text(alphabet="xyz", min_size=0, max_size=12)
inserts = st.lists(st.tuples(texts, st.sampled_from(TENANTS)), max_size=30)


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=150, deadline=None)
@given(inserts, texts, st.sets(st.sampled_from(TENANTS), min_size=1))
def test_prefix_match_is_the_longest_prefix_any_allowed_tenant_was_sent(history, query, allowed):
    tree = ApproxRadixTree()
    for t, (text, tenant) in enumerate(history):
        tree.insert(text, tenant, now=float(t))
    tree.check_integrity()
    best = {tenant: max([_common(text, query) for text, x in history if x == tenant], default=0)
            for tenant in allowed}
    match = tree.prefix_match(query, allowed)
    assert match.matched_chars == max(best.values())
    if match.matched_chars:
        assert best[match.tenant] == match.matched_chars
    # Each tenant holds exactly the distinct characters of the trie of what it was sent.
    for tenant in TENANTS:
        prefixes = {text[:i] for text, x in history if x == tenant for i in range(1, len(text) + 1)}
        assert tree.tenant_chars.get(tenant, 0) == len(prefixes)


@settings(max_examples=100, deadline=None)
@given(inserts, st.integers(min_value=0, max_value=20), st.sampled_from(TENANTS), st.floats(0, 30))
def test_pruning_by_size_and_age_keeps_the_invariant(history, max_chars, tenant, cutoff):
    tree = ApproxRadixTree()
    for t, (text, who) in enumerate(history):
        tree.insert(text, who, now=float(t))
    tree.evict_tenant(tenant, max_chars)
    tree.check_integrity()
    assert tree.tenant_chars.get(tenant, 0) <= max_chars
    tree.evict_older_than(cutoff)
    tree.check_integrity()
    for node in tree._nodes():
        assert all(stamp >= cutoff for stamp in node.tenants.values())
    # What is newer than the cutoff and was not evicted by size stays matchable.
    other = [x for x in TENANTS if x != tenant]
    for t, (text, who) in enumerate(history):
        if t >= cutoff and who in other and text:
            assert tree.prefix_match(text, set(other)).matched_chars == len(text)


@settings(max_examples=50, deadline=None)
@given(inserts)
def test_removing_a_tenant_forgets_only_it(history):
    tree = ApproxRadixTree()
    for t, (text, who) in enumerate(history):
        tree.insert(text, who, now=float(t))
    tree.remove_tenant("a")
    tree.check_integrity()
    assert "a" not in tree.tenant_chars
    for text, who in history:
        if who != "a" and text:
            assert tree.prefix_match(text, {"b", "c"}).matched_chars == len(text)


def test_token_keys_route_like_text():
    tree = ApproxRadixTree()
    tree.insert(token_key([5, 70000, 9]), "w", now=0.0)
    assert tree.prefix_match(token_key([5, 70000, 11]), {"w"}).matched_chars == 2


# ---- crafted traces --------------------------------------------------------------------------------
def _workers(loads: dict[str, int]) -> list[WorkerLoad]:
    return [WorkerLoad(name, load) for name, load in loads.items()]


def test_cache_aware_keeps_each_prefix_group_on_one_worker():
    policy = CacheAware(CacheAwareConfig(cache_threshold=0.5), clock=lambda: 0.0)
    idle = _workers({"w0": 0, "w1": 0})
    system = {g: f"system prompt of group {g}: " + "context " * 20 for g in range(4)}
    first = {g: policy.select(idle, system[g] + "question 0").worker for g in range(4)}
    assert set(first.values()) == {"w0", "w1"}  # new prefixes go to the worker holding less
    for q in range(1, 5):
        for g in range(4):
            decision = policy.select(idle, system[g] + f"question {q}")
            assert (decision.worker, decision.reason) == (first[g], "affinity")


def test_imbalance_overrides_affinity_only_past_both_thresholds():
    policy = CacheAware(CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5), clock=lambda: 0.0)
    prompt = "shared prefix " * 10
    assert policy.select(_workers({"w0": 0, "w1": 0}), prompt + "1").worker == "w0"
    # w0 has 6 more than w1 but not 1.5x as many: affinity still wins.
    assert policy.select(_workers({"w0": 20, "w1": 14}), prompt + "2").reason == "affinity"
    # 10 against 2: both thresholds passed, the least loaded takes it (and learns the prefix).
    decision = policy.select(_workers({"w0": 10, "w1": 2}), prompt + "3")
    assert (decision.worker, decision.reason) == ("w1", "balance")
    assert policy.tree.prefix_match(prompt + "3", {"w1"}).matched_chars == len(prompt + "3")


def test_round_robin_and_power_of_two():
    rr = RoundRobin()
    assert [rr.select(_workers({"a": 0, "b": 0, "c": 0}), "").worker for _ in range(4)] == ["a", "b", "c", "a"]
    p2 = PowerOfTwo(seed=0)
    assert {p2.select(_workers({"a": 9, "b": 0}), "").worker for _ in range(20)} == {"b"}


def test_a_failing_worker_leaves_the_pool_and_comes_back_after_passed_checks():
    router = Router(RouterConfig(worker_urls=("http://w0:1", "http://w1:1"), policy="cache_aware",
                                 health_failure_threshold=2, health_success_threshold=2))
    w0, w1 = router.workers["http://w0:1"], router.workers["http://w1:1"]
    for w in (w0, w1):
        router.record_success(w)  # first check: in the pool
    prompt = "a long shared system prompt " * 4
    first, _ = router.select(prompt + "1")
    router.finished(first)
    other = w1 if first is w0 else w0
    router.record_failure(first, "refused")
    assert first.healthy  # one failure is not enough
    router.record_failure(first, "refused")
    assert not first.healthy
    chosen, decision = router.select(prompt + "2")
    assert chosen is other
    router.finished(chosen)
    router.record_success(first)
    assert not first.healthy  # needs two passed checks to return
    router.record_success(first)
    assert first.healthy
    # Its memory was cleared when it left: the prefix now lives on the other worker.
    again, decision = router.select(prompt + "3")
    assert again is other and decision.reason == "affinity"


# ---- the HTTP relay ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FakeWorker:
    """A server that answers /health and /generate with its name."""

    def __init__(self, name: str):
        self.name, self.port, self.requests = name, _free_port(), 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        if b"/generate" in request_line:
            self.requests += 1
        body = json.dumps({"text": self.name}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()


def test_relay_retries_a_request_that_could_not_reach_its_worker():
    import urllib.request

    import uvicorn

    from plait.router.app import create_router_app

    alive, dying = _FakeWorker("alive"), _FakeWorker("dying")
    dead_url = f"http://127.0.0.1:{dying.port}"
    router = Router(RouterConfig(worker_urls=(dead_url, f"http://127.0.0.1:{alive.port}"), policy="round_robin",
                                 health_check_interval=3600, health_failure_threshold=1, max_retries=1))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_router_app(router), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(router.healthy) < 2 and time.monotonic() < deadline:  # the first health checks
            time.sleep(0.05)
        dying.stop()  # after its check: the router still has it in the pool
        names = []
        for i in range(4):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps({"text": f"q{i}"}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                names.append(json.loads(r.read())["text"])
        assert names == ["alive"] * 4  # one went to the dead worker, was retried, and the worker left the pool
        assert alive.requests == 4 and router.retries_total == 1
        assert not router.workers[dead_url].healthy and router.workers[dead_url].in_flight == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        assert f'plait_router_worker_requests_total{{worker="http://127.0.0.1:{alive.port}"}} 4.0' in metrics
    finally:
        server.should_exit = True
        thread.join(10)
