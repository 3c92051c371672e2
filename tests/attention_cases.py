"""Random attention steps over a token pool, for testing attention backends against the reference.

A case holds a KV pool filled with random values (never zeros: they hide unwritten outputs and wrong
indexing), req_to_token rows pointing at shuffled slots, and this step's q/k/v. `reference` runs the
torch-native backend on float64 copies on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.runtime.attention.base import AttentionBackend
from plait.runtime.attention.torch_native import TorchNativeBackend
from plait.runtime.executor.forward_batch import (
    ForwardBatch,
    make_decode_batch,
    make_extend_batch,
)
from plait.runtime.layers.attention import RadixAttention
from plait.runtime.memory.kv_pool import KVPool, ReqToTokenPool


@dataclass
class AttentionCase:
    batch: ForwardBatch
    layer: RadixAttention
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor


def make_case(
    *,
    prefix_lens: list[int],
    extend_lens: list[int] | None,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    backend: AttentionBackend,
    generator: torch.Generator,
    kv_pool: KVPool | None = None,
    req_pool: ReqToTokenPool | None = None,
) -> AttentionCase:
    """An extend step (extend_lens given) or a decode step (extend_lens None: one new token each).

    Requests take rows of req_to_token in a shuffled order and slots drawn at random from a pool a
    bit larger than needed, so neither rows nor slots are contiguous. Pass `kv_pool` and `req_pool`
    to reuse pools (CUDA graphs hold their addresses); the KV values are redrawn either way.
    """
    decode = extend_lens is None
    extend_lens = [1] * len(prefix_lens) if decode else extend_lens
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    num_tokens = sum(extend_lens)
    batch_size = len(prefix_lens)
    if kv_pool is None:
        kv_pool = KVPool(num_slots=sum(seq_lens) + 64, num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         dtype=dtype, device=device)
        req_pool = ReqToTokenPool(batch_size + 3, max(seq_lens) + 5, device)
    assert req_pool is not None and sum(seq_lens) <= kv_pool.num_slots and batch_size <= req_pool.num_rows
    for buf in (*kv_pool.k_buffers, *kv_pool.v_buffers):
        buf.copy_(torch.randn(buf.shape, generator=generator))
    slots = (torch.randperm(kv_pool.num_slots, generator=generator)[: sum(seq_lens)] + 1).tolist()
    rows = (torch.randperm(req_pool.num_rows, generator=generator)[:batch_size] + 1).tolist()
    out_cache_loc = []
    for row, prefix_len, seq_len in zip(rows, prefix_lens, seq_lens):
        mine, slots = slots[:seq_len], slots[seq_len:]
        req_pool.write(row, 0, torch.tensor(mine[:prefix_len], dtype=torch.int64, device=device))
        out_cache_loc += mine[prefix_len:]
    out_cache_loc_t = torch.tensor(out_cache_loc, dtype=torch.int64, device=device)
    common = {"out_cache_loc": out_cache_loc_t, "req_to_token_pool": req_pool, "kv_pool": kv_pool, "attn_backend": backend}
    if decode:
        batch = make_decode_batch(req_pool_indices=rows, seq_lens=seq_lens, last_token_ids=[0] * batch_size, **common)
    else:
        batch = make_extend_batch(req_pool_indices=rows, prefix_lens=prefix_lens,
                                  new_token_ids=[[0] * e for e in extend_lens], **common)
    layer = RadixAttention(layer_id=0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           scaling=head_dim**-0.5)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn((num_tokens, heads, head_dim), generator=generator).to(device, dtype)

    return AttentionCase(batch, layer, rand(num_heads), rand(num_kv_heads), rand(num_kv_heads))


def run(case: AttentionCase, backend: AttentionBackend | None = None) -> torch.Tensor:
    """One layer's attention through `backend` (default: the case's own), as the model calls it."""
    backend = backend or case.batch.attn_backend
    case.batch.attn_backend = backend
    backend.init_forward_metadata(case.batch)
    return backend.forward(case.q, case.k, case.v, case.layer, case.batch)


def reference(case: AttentionCase) -> torch.Tensor:
    """The torch-native backend on float64 copies of everything, on the CPU."""
    b = case.batch
    kv_pool = KVPool(num_slots=b.kv_pool.num_slots, num_layers=1, num_kv_heads=b.kv_pool.num_kv_heads,
                     head_dim=b.kv_pool.head_dim, dtype=torch.float64)
    kv_pool.k_buffers[0].copy_(b.kv_pool.k_buffers[0].cpu())
    kv_pool.v_buffers[0].copy_(b.kv_pool.v_buffers[0].cpu())
    req_pool = ReqToTokenPool(b.req_to_token_pool.num_rows, b.req_to_token_pool.max_context_len)
    req_pool.req_to_token.copy_(b.req_to_token_pool.req_to_token.cpu())
    backend = TorchNativeBackend()
    batch = ForwardBatch(
        mode=b.mode, input_ids=b.input_ids.cpu(), positions=b.positions.cpu(), out_cache_loc=b.out_cache_loc.cpu(),
        req_pool_indices=b.req_pool_indices.cpu(), seq_lens=b.seq_lens.cpu(), seq_lens_cpu=b.seq_lens_cpu,
        prefix_lens_cpu=b.prefix_lens_cpu, extend_lens_cpu=b.extend_lens_cpu, req_to_token_pool=req_pool,
        kv_pool=kv_pool, attn_backend=backend,
    )
    backend.init_forward_metadata(batch)
    f64 = [t.cpu().double() for t in (case.q, case.k, case.v)]
    return backend.forward(*f64, case.layer, batch)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def make_shared_prefix_case(
    *,
    plan: list[tuple[int, list[int]]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    backend: AttentionBackend,
    generator: torch.Generator,
) -> AttentionCase:
    """A decode step whose requests come in groups sharing a prefix of slots, as the radix cache
    leaves them: `plan` is [(prefix length, [each member's own length (>= 1, the new token included)])];
    a prefix length of 0 makes its members ungrouped. Members are shuffled through the batch, and
    `batch.shared_prefixes` holds the groups of more than one member."""
    seq_lens = [p + own for p, owns in plan for own in owns]
    batch_size = len(seq_lens)
    kv_pool = KVPool(num_slots=sum(p + sum(owns) for p, owns in plan) + 64, num_layers=1,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device=device)
    req_pool = ReqToTokenPool(batch_size + 3, max(seq_lens) + 5, device)
    for buf in (*kv_pool.k_buffers, *kv_pool.v_buffers):
        buf.copy_(torch.randn(buf.shape, generator=generator))
    free = (torch.randperm(kv_pool.num_slots, generator=generator) + 1).tolist()
    order = torch.randperm(batch_size, generator=generator).tolist()  # batch position of the i-th member
    rows = (torch.randperm(req_pool.num_rows, generator=generator)[:batch_size] + 1).tolist()
    out_cache_loc = [0] * batch_size
    lens = [0] * batch_size
    groups = []
    i = 0
    for prefix_len, owns in plan:
        prefix, free = free[:prefix_len], free[prefix_len:]
        positions = []
        for own in owns:
            pos = order[i]
            i += 1
            mine, free = free[:own], free[own:]
            req_pool.write(rows[pos], 0, torch.tensor(prefix + mine[:-1], dtype=torch.int64, device=device))
            out_cache_loc[pos], lens[pos] = mine[-1], prefix_len + own
            positions.append(pos)
        if prefix_len and len(owns) > 1:
            groups.append((sorted(positions), prefix_len))
    batch = make_decode_batch(
        req_pool_indices=rows, seq_lens=lens, last_token_ids=[0] * batch_size,
        out_cache_loc=torch.tensor(out_cache_loc, dtype=torch.int64, device=device),
        req_to_token_pool=req_pool, kv_pool=kv_pool, attn_backend=backend,
    )
    batch.shared_prefixes = groups
    layer = RadixAttention(layer_id=0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           scaling=head_dim**-0.5)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn((batch_size, heads, head_dim), generator=generator).to(device, dtype)

    return AttentionCase(batch, layer, rand(num_heads), rand(num_kv_heads), rand(num_kv_heads))
