"""Data parallelism inside one server (`--dp-size`): the transport over the replicas with fake
replicas (routing, aborts, combined queries, a dying replica), and a real two-replica server where
cache-aware routing keeps each prefix group on one replica's cache."""

from __future__ import annotations

import json

import pytest

from plait.runtime.frontend.dp_transport import DataParallelTransport
from plait.runtime.frontend.messages import (
    AbortRequest,
    FlushCacheQuery,
    GenerateRequest,
    InfoQuery,
    OutputBatch,
    QueryReply,
    RequestOutput,
    SchedulerFailed,
)
from plait.sampling_params import SamplingParams
from tests.test_server_utils import ServerProcess, post, write_tiny_model


class _FakeReplica:
    def __init__(self) -> None:
        self.sent: list = []
        self.deliver = None

    def start(self, deliver) -> None:
        self.deliver = deliver

    def send(self, msg) -> None:
        self.sent.append(msg)


def _request(rid: str, ids: list[int]) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=ids, sampling_params=SamplingParams())


def test_requests_follow_their_prefix_aborts_their_replica_and_queries_every_replica():
    replicas = [_FakeReplica(), _FakeReplica()]
    transport = DataParallelTransport(replicas, policy="cache_aware")
    delivered: list = []
    transport.start(delivered.append)
    prefix_a, prefix_b = list(range(100, 140)), list(range(500, 540))
    for i in range(3):
        transport.send(_request(f"a{i}", prefix_a + [i]))
        transport.send(_request(f"b{i}", prefix_b + [i]))
    owner = {m.rid: k for k, r in enumerate(replicas) for m in r.sent}
    assert len({owner[f"a{i}"] for i in range(3)}) == 1 and len({owner[f"b{i}"] for i in range(3)}) == 1
    assert owner["a0"] != owner["b0"]
    transport.send(AbortRequest("b1"))
    assert isinstance(replicas[owner["b1"]].sent[-1], AbortRequest)
    # A finished output releases its replica's load; queries are answered once every replica replied.
    replicas[owner["a0"]].deliver(OutputBatch([RequestOutput("a0", "", [], finished=True)]))
    assert transport.in_flight[owner["a0"]] == 2
    transport.send(InfoQuery(7))
    replicas[0].deliver(QueryReply(7, "state0"))
    assert not any(isinstance(m, QueryReply) for m in delivered)
    replicas[1].deliver(QueryReply(7, "state1"))
    assert [m.result for m in delivered if isinstance(m, QueryReply)] == [["state0", "state1"]]
    transport.send(FlushCacheQuery(8))
    replicas[0].deliver(QueryReply(8, True))
    replicas[1].deliver(QueryReply(8, False))
    assert delivered[-1] == QueryReply(8, False)
    replicas[1].deliver(SchedulerFailed("boom"))
    assert delivered[-1] == SchedulerFailed("data-parallel replica 1: boom")


@pytest.mark.slow
def test_two_replicas_behind_one_server_keep_prefix_groups_on_one_cache(tmp_path, default_tokenizer):
    model = str(write_tiny_model(tmp_path, default_tokenizer))
    srv = ServerProcess("--model-path", model, "--dp-size", "2", "--dtype", "float32", "--max-total-tokens", "4096")
    try:
        srv.wait_ready(timeout=300)
        groups = ["You are a terse assistant for group one. " * 8, "Translate into French, group two. " * 8]
        for g in groups:  # one group after the other: round robin would split each group over both replicas
            for q in range(3):
                status, body = post(srv.url + "/generate", {"text": g + f"question {q}?", "sampling_params": {
                    "max_new_tokens": 4, "temperature": 0}})
                assert status == 200, body
        info = json.loads(srv.get("/get_server_info")[1])
        assert info["dp_size"] == 2 and info["load_balance_method"] == "cache_aware"
        # Six requests, and the warm-up generation of the server start.
        assert len(info["replicas"]) == 2 and sum(r["dispatched"] for r in info["replicas"]) >= 6
        states = info["internal_states"]
        assert len(states) == 2
        prefix_len = min(len(default_tokenizer.encode(g)) for g in groups)
        for state in states:  # each replica computed its group's prefix once, then hit it twice
            assert state["cache"]["cached_tokens_total"] >= 2 * (prefix_len - 4), state["cache"]
    finally:
        srv.stop()
