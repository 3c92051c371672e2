"""The torch-native decode path that attends a group's shared prefix once (cascade attention)
computes the same attention as attending every request over its whole KV."""

from __future__ import annotations

import random

import pytest
import torch

from plait.runtime.attention import torch_native
from plait.runtime.attention.torch_native import TorchNativeBackend
from plait.runtime.executor.forward_batch import make_decode_batch
from plait.runtime.layers.attention import RadixAttention
from plait.runtime.memory.kv_pool import KVPool, ReqToTokenPool


def _reference(q, k_buf, v_buf, rows, seq_lens, layer):
    """Per request softmax attention in float64 over its req_to_token row."""
    out = []
    group = layer.num_heads // layer.num_kv_heads
    for i, (row, seq_len) in enumerate(zip(rows, seq_lens)):
        k = k_buf[row[:seq_len]].double().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_buf[row[:seq_len]].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].double(), k) * layer.scaling
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def _random_pools(seed: int, dtype: torch.dtype, num_kv_heads: int, head_dim: int):
    """A one-layer KV pool of random K/V, a req_to_token table, and `take(n)`: n distinct random slots."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = KVPool(num_slots=6000, num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    pool.k_buffers[0].normal_()
    pool.v_buffers[0].normal_()
    free = list(range(1, 6001))
    rng.shuffle(free)

    def take(n):
        return [free.pop() for _ in range(n)]

    return rng, pool, ReqToTokenPool(32, 1024), take


def _build(seed: int, dtype: torch.dtype, num_heads: int, num_kv_heads: int):
    """A decode batch of several prefix groups (different prefix lengths), singletons and a pair that
    shares only a short prefix; requests of a group have suffixes of different lengths."""
    head_dim = 16
    rng, pool, req_pool, take = _random_pools(seed, dtype, num_kv_heads, head_dim)

    rows, seq_lens, slot_rows = [], [], []
    plan = [(rng.randint(70, 300), rng.randint(2, 6)) for _ in range(3)]  # (prefix length, members)
    plan += [(0, 1), (0, 1), (10, 2)]  # no sharing; a prefix shorter than the cascade threshold
    for prefix_len, members in plan:
        prefix = take(prefix_len)
        for _ in range(members):
            row = req_pool.alloc()
            suffix = take(rng.randint(1, 40) if prefix_len else rng.randint(1, 400))
            slots = prefix + suffix
            req_pool.req_to_token[row, : len(slots)] = torch.tensor(slots)
            rows.append(row)
            seq_lens.append(len(slots))
            slot_rows.append(torch.tensor(slots))
    order = list(range(len(rows)))
    rng.shuffle(order)  # group members need not be adjacent in the batch
    rows = [rows[i] for i in order]
    seq_lens = [seq_lens[i] for i in order]
    slot_rows = [slot_rows[i] for i in order]
    backend = TorchNativeBackend()
    out_loc = torch.tensor([int(s[-1]) for s in slot_rows])
    batch = make_decode_batch(
        req_pool_indices=rows, seq_lens=seq_lens, last_token_ids=[0] * len(rows), out_cache_loc=out_loc,
        req_to_token_pool=req_pool, kv_pool=pool, attn_backend=backend,
    )
    layer = RadixAttention(layer_id=0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           scaling=head_dim**-0.5)
    q = torch.randn(len(rows), num_heads, head_dim).to(dtype)
    return backend, batch, layer, q, slot_rows, seq_lens, pool


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_cascade_decode_equals_reference(seed, num_heads, num_kv_heads):
    backend, batch, layer, q, slot_rows, seq_lens, pool = _build(seed, torch.float32, num_heads, num_kv_heads)
    backend.init_forward_metadata(batch)
    meta = batch.attn_metadata
    # The three long-prefix groups take the cascade path; singletons and the short pair do not.
    assert meta.shared.slots.shape[0] == 3 and meta.plain is not None and meta.plain.rows.numel() == 4
    out = backend.forward_decode(q, layer, batch)
    ref = _reference(q, pool.k_buffers[0], pool.v_buffers[0], slot_rows, seq_lens, layer)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_cascade_matches_the_padded_path_in_bfloat16(monkeypatch):
    backend, batch, layer, q, slot_rows, seq_lens, pool = _build(3, torch.bfloat16, 6, 2)
    backend.init_forward_metadata(batch)
    cascade = backend.forward_decode(q, layer, batch)
    monkeypatch.setattr(torch_native, "CASCADE_MIN_PREFIX", 10**9)
    backend.init_forward_metadata(batch)
    assert batch.attn_metadata.shared is None
    padded = backend.forward_decode(q, layer, batch)
    ref = _reference(q, pool.k_buffers[0], pool.v_buffers[0], slot_rows, seq_lens, layer)
    for out in (cascade, padded):
        err = (out.double() - ref).norm() / ref.norm()
        assert err < 1e-2


def _extend_reference(q, k_buf, v_buf, slot_rows, prefix_lens, layer):
    """Each request's new tokens over its prefix and themselves, causally, in float64."""
    out, start = [], 0
    group = layer.num_heads // layer.num_kv_heads
    for slots, prefix_len in zip(slot_rows, prefix_lens):
        n = len(slots) - prefix_len
        k = k_buf[slots].double().repeat_interleave(group, dim=1)
        v = v_buf[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[start : start + n].double(), k) * layer.scaling
        visible = torch.arange(len(slots))[None, :] <= (torch.arange(n)[:, None] + prefix_len)
        scores = scores.masked_fill(~visible, float("-inf"))
        out.append(torch.einsum("hql,lhd->qhd", scores.softmax(-1), v))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_extend_over_a_shared_cached_prefix_equals_reference(seed, num_heads, num_kv_heads):
    """Requests extending over one cached prefix (some with more cached tokens of their own) attend
    the shared part in one product; a request without a prefix and a short-prefix pair do not."""
    from plait.runtime.executor.forward_batch import make_extend_batch

    head_dim = 16
    rng, pool, req_pool, take = _random_pools(seed, torch.float32, num_kv_heads, head_dim)

    rows, prefix_lens, slot_rows, new_ids = [], [], [], []
    for shared_len, members in [(rng.randint(70, 200), 3), (rng.randint(70, 200), 2), (0, 1), (20, 2)]:
        shared = take(shared_len)
        for _ in range(members):
            cached = shared + (take(rng.randint(0, 30)) if shared_len else [])
            new = take(rng.randint(1, 40))
            row = req_pool.alloc()
            req_pool.req_to_token[row, : len(cached)] = torch.tensor(cached, dtype=torch.int64)
            rows.append(row)
            prefix_lens.append(len(cached))
            slot_rows.append(cached + new)
            new_ids.append([0] * len(new))
    backend = TorchNativeBackend()
    out_loc = torch.tensor([s for slots, p in zip(slot_rows, prefix_lens) for s in slots[p:]])
    batch = make_extend_batch(
        req_pool_indices=rows, prefix_lens=prefix_lens, new_token_ids=new_ids, out_cache_loc=out_loc,
        req_to_token_pool=req_pool, kv_pool=pool, attn_backend=backend,
    )
    layer = RadixAttention(layer_id=0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           scaling=head_dim**-0.5)
    q = torch.randn(batch.num_tokens, num_heads, head_dim)
    backend.init_forward_metadata(batch)
    assert [len(g.members) for g in batch.attn_metadata.groups] == [3, 2]
    out = backend.forward_extend(q, layer, batch)
    ref = _extend_reference(q, pool.k_buffers[0], pool.v_buffers[0], slot_rows, prefix_lens, layer)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-4)
