"""Tensor parallelism on the CPU over gloo: two rank processes behind one server give the same greedy
tokens as one process, in float32, on the default model (9 heads over 3 KV heads: an uneven split,
with its GGUF 4-bit blocks sharded by rows and by whole column blocks) and on a tiny model with one
KV head (replicated on both ranks); a killed rank takes the server down with a clear error."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest

from plait.runtime.distributed.ranks import rendezvous_port
from plait.runtime.distributed.sharding import DecoderShard, Span, split_evenly
from plait.runtime.engine import Engine
from tests.test_server_utils import ServerProcess, post, write_tiny_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_split_evenly_covers_the_range_in_order():
    for total, parts, unit in [(10, 3, 1), (1536, 2, 32), (96, 3, 32), (5, 5, 1)]:
        spans = [split_evenly(total, parts, i, unit=unit) for i in range(parts)]
        assert spans[0].start == 0 and spans[-1].end == total
        assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
        assert max(s.count for s in spans) - min(s.count for s in spans) <= unit
        assert all(s.count % unit == 0 for s in spans)


def test_head_plans_keep_gqa_groups_whole_or_replicate_kv_heads():
    # The default model: 9 query heads in 3 groups over 2 ranks -> 2 groups and 1 group.
    a, b = (DecoderShard.plan(num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152, rank=r, size=2)
            for r in range(2))
    assert (a.q_heads, a.kv_heads, b.q_heads, b.kv_heads) == (Span(0, 6), Span(0, 2), Span(6, 3), Span(2, 1))
    assert (a.intermediate, b.intermediate) == (Span(0, 768), Span(768, 768))
    assert a.vocab == Span(0, 24576) and b.vocab == Span(24576, 24576)
    # One KV head over 2 ranks: both hold it, each takes half its query heads.
    c, d = (DecoderShard.plan(num_heads=4, num_kv_heads=1, intermediate_size=128, vocab_size=101, rank=r, size=2)
            for r in range(2))
    assert (c.kv_heads, d.kv_heads, c.q_heads, d.q_heads) == (Span(0, 1), Span(0, 1), Span(0, 2), Span(2, 2))
    assert c.vocab == Span(0, 51) and d.vocab == Span(51, 50) and c.vocab_per_rank == 51
    with pytest.raises(ValueError, match="replicate"):
        DecoderShard.plan(num_heads=6, num_kv_heads=2, intermediate_size=64, vocab_size=10, rank=0, size=3)


def _greedy(url: str, prompt: str, n: int) -> list[int]:
    status, body = post(url + "/generate", {"text": prompt, "sampling_params": {
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}}, timeout=300)
    assert status == 200, body
    return body["output_ids"]


def _reference(n: int, **options) -> list[list[int]]:
    with Engine(dtype="float32", device="cpu", max_total_tokens=4096, **options) as engine:
        results = engine.generate(PROMPTS, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
        return [r["output_ids"] for r in results]


@pytest.mark.slow
def test_tp2_matches_tp1_on_the_default_model():
    expected = _reference(16)
    srv = ServerProcess("--tp-size", "2", "--dtype", "float32", "--max-total-tokens", "4096")
    try:
        srv.wait_ready(timeout=300)
        assert [_greedy(srv.url, p, 16) for p in PROMPTS] == expected
        status, raw = srv.get("/get_server_info")
        assert status == 200
        info = json.loads(raw)
        assert info["tp_size"] == 2
        execution = info["internal_states"][0]["execution"]
        assert execution["tensor_parallel"].startswith("2 ranks over gloo; rank 0 holds 6 of 9 heads, 2 of 3 KV heads")
        assert execution["cpu_graph"].startswith("off (tensor parallelism")
        assert "Q4_1" in execution["weights"]  # the GGUF blocks were sharded, not dequantized
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def one_kv_head_model(tmp_path_factory, default_tokenizer):
    return str(write_tiny_model(tmp_path_factory.mktemp("gqa1"), default_tokenizer, num_key_value_heads=1,
                                max_position_embeddings=8192))


@pytest.mark.slow
def test_tp2_over_two_nodes_with_a_replicated_kv_head_matches_tp1_then_a_killed_rank_stops_both(one_kv_head_model):
    """Two "nodes" on this machine (--nnodes 2): node 0 serves HTTP with rank 0, node 1 runs rank 1."""
    expected = _reference(24, model_path=one_kv_head_model)
    flags = ("--model-path", one_kv_head_model, "--tp-size", "2", "--dtype", "float32", "--max-total-tokens", "16384",
             "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{rendezvous_port()}")
    node1 = ServerProcess(*flags, "--node-rank", "1")
    srv = ServerProcess(*flags, "--node-rank", "0")
    try:
        srv.wait_ready(timeout=300)
        assert [_greedy(srv.url, p, 24) for p in PROMPTS] == expected
        assert "tensor-parallel rank 1" not in srv.output  # it runs on the other node
        rank1 = int(re.search(r"tensor-parallel rank 1 of 2 in pid (\d+)", node1.output).group(1))
        result: dict = {}

        def endless() -> None:
            result["reply"] = post(srv.url + "/generate", {"text": "long", "sampling_params": {
                "max_new_tokens": 7000, "ignore_eos": True}}, timeout=120)

        thread = threading.Thread(target=endless)
        thread.start()
        time.sleep(1.5)  # decoding
        os.kill(rank1, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive(), "the request hung after a rank died"
        status, body = result["reply"]
        assert status >= 500 and "tensor-parallel rank" in body["error"]["message"], body
        assert srv.proc.wait(60) == 1, srv.output
        assert node1.proc.wait(60) == 1, node1.output  # node 1 stops too: its rank is gone
    finally:
        srv.stop()
        node1.stop()


def test_the_rendezvous_port_is_free_and_outside_the_ephemeral_range():
    """Ranks on one machine meet on a free port below the kernel's ephemeral range: a port from it can be
    taken by another rank's own connection attempt (a socket connected to itself) before rank 0 listens."""
    import socket

    from plait.runtime.distributed.ranks import init_method_for

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(5):
        port = int(init_method_for(None, 0).rpartition(":")[2])
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
    assert init_method_for("10.0.0.1:5000", 2) == "tcp://10.0.0.1:5002"
