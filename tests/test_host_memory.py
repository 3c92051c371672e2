"""Memory on the CPU: the KV pool starts zeroed without touching its pages, and a cache flush hands
its pages back (they read as zeros again) and leaves it usable; the pool is sized by the CPU rule."""

from __future__ import annotations

import os
import time

import pytest
import torch
import transformers

from plait.runtime.engine import Engine
from plait.runtime.executor.model_runner import cpu_default_kv_slots
from plait.runtime.memory.kv_pool import KVPool
from tests.tiny_models import InMemorySource


def _pool(num_slots: int = 4096) -> KVPool:
    return KVPool(num_slots=num_slots, num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)


def test_pool_starts_zeroed_and_release_returns_it_to_zeros():
    pool = _pool()
    assert all(not k.any() and not v.any() for k, v in zip(pool.k_buffers, pool.v_buffers))
    slots = torch.tensor([1, 7, 4000])
    kv = torch.ones(3, 2, 64)
    for layer in range(2):
        pool.set_kv(layer, slots, kv, -kv)
    assert pool.k_buffers[1][7].eq(1).all() and pool.v_buffers[0][4000].eq(-1).all()
    pool.release_memory()
    assert all(not k.any() and not v.any() for k, v in zip(pool.k_buffers, pool.v_buffers))
    pool.set_kv(0, slots, kv, kv)  # still the same, writable memory
    assert pool.k_buffers[0][4000].eq(1).all()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_a_large_pool_costs_no_resident_memory_until_written():
    before = _rss_kib()
    pool = _pool(num_slots=256 * 1024)  # 256 MiB of bf16 KV
    assert pool.k_buffers[0].numel() * 2 * 4 * 2 >= 256 << 20
    assert _rss_kib() - before < 64 << 10  # a zero-filled torch tensor would have added all 256 MiB
    del pool


@pytest.fixture(scope="module")
def engine(default_tokenizer):
    cfg = transformers.LlamaConfig(
        vocab_size=len(default_tokenizer.hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    torch.manual_seed(3)
    source = InMemorySource(transformers.AutoModelForCausalLM.from_config(cfg).eval(), tokenizer=default_tokenizer)
    with Engine(source=source, dtype="float32", device="cpu") as e:
        yield e


def test_cpu_pool_default_takes_room_for_many_requests(engine):
    # a tiny model's KV is small: the budget allows more than 16 contexts, so 16 it is
    assert engine.runner.kv_pool.num_slots == 16 * engine.runner.context_length == 16384


def test_cpu_pool_default_rule():
    gib = 1 << 30
    per_token = 23040  # the default model: 30 layers, 3 KV heads of 64, 16-bit K and V
    # plenty of memory: 2 GiB of KV
    assert cpu_default_kv_slots(per_token, 8192, 20 * gib) == (2 * gib) // per_token
    # little memory: a quarter of it, but never fewer than two contexts
    assert cpu_default_kv_slots(per_token, 8192, 4 * gib) == gib // per_token
    assert cpu_default_kv_slots(per_token, 8192, gib // 2) == 2 * 8192
    # memory unknown: the 2 GiB budget
    assert cpu_default_kv_slots(per_token, 8192, None) == (2 * gib) // per_token
    # a long-context model: two contexts would pass 2 GiB, so 2 GiB it is
    assert cpu_default_kv_slots(131072, 131072, 64 * gib) == (2 * gib) // 131072
    # a small context: at most 16 of them
    assert cpu_default_kv_slots(per_token, 1024, 20 * gib) == 16 * 1024


def test_flush_cache_gives_the_pool_back(engine):
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    first = engine.generate("A story about a lighthouse keeper", params)["text"]
    pool = engine.runner.kv_pool
    assert any(k.any() for k in pool.k_buffers)  # the prompt's KV is in the pool (and cached)
    assert engine.flush_cache()
    deadline = time.monotonic() + 10
    while any(k.any() for k in pool.k_buffers) and time.monotonic() < deadline:
        time.sleep(0.05)  # the flush is carried out by the scheduler thread
    assert not any(k.any() or v.any() for k, v in zip(pool.k_buffers, pool.v_buffers))
    assert engine.generate("A story about a lighthouse keeper", params)["text"] == first  # recomputed, same
