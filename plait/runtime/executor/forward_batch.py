"""`ForwardBatch`: everything one forward pass needs, as index tensors over the KV pool.

An extend step computes KV for `input_ids` (the new tokens of several requests, concatenated)
while attending to each request's already cached prefix; a decode step is the special case of
one new token per request. Attention backends read KV only through `req_to_token` rows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from plait.runtime.attention.base import AttentionBackend
    from plait.runtime.memory.kv_pool import KVPool, ReqToTokenPool


class ForwardMode(enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    out_cache_loc: torch.Tensor  # [num_tokens] int64: KV slot each new token writes
    req_pool_indices: torch.Tensor  # [batch_size] int64: rows of req_to_token
    seq_lens: torch.Tensor  # [batch_size] int64: KV length after this step (prefix + extend)
    # Host copies of the lengths, so metadata building never syncs with the device.
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    req_to_token_pool: "ReqToTokenPool"
    kv_pool: "KVPool"
    attn_backend: "AttentionBackend"
    # Which rows of the hidden states get logits: by default the last token of each request.
    # `logits_start_lens[i]` asks for logits at every new token of request i from that offset
    # inside its extend part (prompt logprobs); None means only the last token.
    logits_start_lens: list[int | None] | None = None
    # Decode: groups of requests whose req_to_token rows start with the same cached slots, as
    # (batch positions, shared length); set by the scheduler for backends that attend such a prefix
    # once per group (`AttentionBackend.supports_shared_prefix_decode`).
    shared_prefixes: list[tuple[list[int], int]] | None = None
    req_pool_indices_cpu: list[int] | None = None  # host copy of req_pool_indices, where the maker had it
    attn_metadata: Any = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def check(self) -> None:
        assert len(self.prefix_lens_cpu) == len(self.extend_lens_cpu) == self.batch_size
        for prefix_len, extend_len, seq_len in zip(self.prefix_lens_cpu, self.extend_lens_cpu, self.seq_lens_cpu):
            assert 0 <= prefix_len and extend_len >= 1 and prefix_len + extend_len == seq_len
        assert sum(self.extend_lens_cpu) == self.num_tokens == self.positions.shape[0] == self.out_cache_loc.shape[0]
        if self.mode is ForwardMode.DECODE:
            assert all(n == 1 for n in self.extend_lens_cpu)


def make_extend_batch(
    *,
    req_pool_indices: list[int],
    prefix_lens: list[int],
    new_token_ids: list[list[int]],
    out_cache_loc: torch.Tensor,
    req_to_token_pool: "ReqToTokenPool",
    kv_pool: "KVPool",
    attn_backend: "AttentionBackend",
    logits_start_lens: list[int | None] | None = None,
) -> ForwardBatch:
    """An extend step: request i computes `new_token_ids[i]` at positions after its cached `prefix_lens[i]`.

    The caller has allocated `out_cache_loc` (one slot per new token, requests concatenated) and
    already written each request's prefix slots into its req_to_token row; this writes the new slots.
    """
    device = out_cache_loc.device
    extend_lens = [len(t) for t in new_token_ids]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    offset = 0
    for row, prefix_len, extend_len in zip(req_pool_indices, prefix_lens, extend_lens):
        req_to_token_pool.write(row, prefix_len, out_cache_loc[offset : offset + extend_len])
        offset += extend_len
    assert offset == out_cache_loc.numel()
    positions = torch.cat([torch.arange(p, s, dtype=torch.int64) for p, s in zip(prefix_lens, seq_lens)])
    flat_ids = [t for ids in new_token_ids for t in ids]
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=torch.tensor(flat_ids, dtype=torch.int64).to(device, non_blocking=True),
        positions=positions.to(device, non_blocking=True),
        out_cache_loc=out_cache_loc,
        req_pool_indices=torch.tensor(req_pool_indices, dtype=torch.int64).to(device, non_blocking=True),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True),
        seq_lens_cpu=seq_lens,
        prefix_lens_cpu=list(prefix_lens),
        extend_lens_cpu=extend_lens,
        req_to_token_pool=req_to_token_pool,
        kv_pool=kv_pool,
        attn_backend=attn_backend,
        logits_start_lens=logits_start_lens,
        req_pool_indices_cpu=list(req_pool_indices),
    )
    batch.check()
    return batch


def make_decode_batch(
    *,
    req_pool_indices: list[int],
    seq_lens: list[int],
    last_token_ids: list[int] | torch.Tensor,
    out_cache_loc: torch.Tensor,
    req_to_token_pool: "ReqToTokenPool",
    kv_pool: "KVPool",
    attn_backend: "AttentionBackend",
) -> ForwardBatch:
    """A decode step: request i runs its last sampled token at position `seq_lens[i] - 1`.

    `seq_lens` are the KV lengths *after* this step; `out_cache_loc[i]` is the new token's slot.
    `last_token_ids` may be a device tensor: tokens the previous step sampled that the host has
    not read yet (overlap scheduling).
    """
    device = out_cache_loc.device
    rows = torch.tensor(req_pool_indices, dtype=torch.int64).to(device, non_blocking=True)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True)
    positions = seq_lens_t - 1
    req_to_token_pool.write_points(rows, positions, out_cache_loc)
    batch = ForwardBatch(
        mode=ForwardMode.DECODE,
        input_ids=(last_token_ids if isinstance(last_token_ids, torch.Tensor)
                   else torch.tensor(last_token_ids, dtype=torch.int64).to(device, non_blocking=True)),
        positions=positions,
        out_cache_loc=out_cache_loc,
        req_pool_indices=rows,
        seq_lens=seq_lens_t,
        seq_lens_cpu=list(seq_lens),
        prefix_lens_cpu=[s - 1 for s in seq_lens],
        extend_lens_cpu=[1] * len(seq_lens),
        req_to_token_pool=req_to_token_pool,
        kv_pool=kv_pool,
        attn_backend=attn_backend,
        req_pool_indices_cpu=list(req_pool_indices),
    )
    batch.check()
    return batch
