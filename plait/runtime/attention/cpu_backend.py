"""The CPU attention backend: Plait's C++ kernels read K and V from the pool in place.

Each request is one "query sequence" of the kernel: its new tokens' queries over the slots of its
req_to_token row (the kernel is handed the table itself and each row's offset), causal for
extend, one query for decode. Nothing is gathered per layer: the metadata (a handful of small
index tensors) is built once per step and every layer reuses it.

Requests that share a cached prefix (their rows start with the same slots; the scheduler finds
them on the prefix tree) are attended as a cascade, in decode and extend steps alike: each group's
queries read the shared prefix once, in one kernel sequence whose rows are all the group's queries,
then each request reads only the rest of its own row; the two partial results are merged through
their log-sum-exps. That keeps a step's KV reads at one copy of each shared prefix instead of one
per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from plait.runtime.attention.base import AttentionBackend
from plait.runtime.cpu import kernels
from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from plait.runtime.layers.attention import RadixAttention

# A decode group attends its shared prefix once only when the prefix is at least this long; below,
# the second pass and the merge cost more than the keys they save.
CASCADE_MIN_PREFIX = 64


@dataclass
class _Sequences:
    """Index tensors of one kernel call (all int64, see `kernels.attention`)."""

    q_rows: torch.Tensor
    q_off: torch.Tensor
    q_len: torch.Tensor
    slots: torch.Tensor
    slot_off: torch.Tensor
    kv_len: torch.Tensor
    causal: bool


@dataclass
class _CpuMetadata:
    main: _Sequences  # every request over its own KV (after its group's prefix, for cascade members)
    prefixes: _Sequences | None = None  # cascade: each group's queries over the prefix it shares
    cascade_rows: torch.Tensor | None = None  # rows whose result merges both passes


class CpuBackend(AttentionBackend):
    stores_kv_with_rotary = True
    supports_shared_prefix_decode = True
    supports_shared_prefix_extend = True
    shared_prefix_min_saved_tokens = CASCADE_MIN_PREFIX

    def __init__(self, prefill_attention: str = "float", **_: object):
        self._arange = torch.arange(0)
        # how tasks of many query rows multiply ("int16" or "float"; AMX attention runs in the stack alone)
        self.arith = "int16" if prefill_attention == "int16" else "float"

    def _range(self, n: int) -> torch.Tensor:
        if self._arange.numel() < n:
            self._arange = torch.arange(max(n, 2 * self._arange.numel()), dtype=torch.int64)
        return self._arange[:n]

    def kv_cache_dtypes(self, model_dtype: torch.dtype) -> set[torch.dtype]:
        return set(kernels.CACHE_FORMATS)  # converted to float32 as a block of keys is loaded

    def preferred_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype | None:
        # A decode step reads every cached token's K and V: float16 halves those bytes (at 4k tokens
        # of context they equal the default model's weights), with ten bits of mantissa and the
        # kernels' F16C conversion costing next to nothing. llama.cpp stores float16 KV by default too.
        return torch.float16

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        table = batch.req_to_token_pool.req_to_token
        width = table.shape[1]
        rows = batch.req_pool_indices_cpu
        if rows is None:
            rows = batch.req_pool_indices.tolist()
        extend_lens, seq_lens = batch.extend_lens_cpu, batch.seq_lens_cpu
        q_starts = [0]
        for n in extend_lens[:-1]:
            q_starts.append(q_starts[-1] + n)
        groups = [(members, n) for members, n in (batch.shared_prefixes or [])
                  if n >= CASCADE_MIN_PREFIX and len(members) > 1]
        start = [0] * batch.batch_size  # where each request's own pass begins in its row
        for members, shared in groups:
            for i in members:
                start[i] = shared
        main = _Sequences(
            self._range(batch.num_tokens), _index(q_starts), _index(extend_lens), table,
            _index([r * width + s for r, s in zip(rows, start)]),
            _index([length - s for length, s in zip(seq_lens, start)]),
            causal=batch.mode is ForwardMode.EXTEND,
        )
        if not groups:
            batch.attn_metadata = _CpuMetadata(main)
            return
        # Each group's queries (every new token of every member) over the prefix they share: all of
        # it is visible to all of them, since their new tokens come after it.
        member_rows: list[int] = []
        group_off, group_len = [], []
        for members, _ in groups:
            group_off.append(len(member_rows))
            for i in members:
                member_rows.extend(range(q_starts[i], q_starts[i] + extend_lens[i]))
            group_len.append(len(member_rows) - group_off[-1])
        prefixes = _Sequences(
            _index(member_rows), _index(group_off), _index(group_len), table,
            _index([rows[members[0]] * width for members, _ in groups]), _index([n for _, n in groups]),
            causal=False,
        )
        batch.attn_metadata = _CpuMetadata(main, prefixes, _index(sorted(member_rows)))

    def _attend(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch, seqs: _Sequences, *,
                out: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
        k_buf, v_buf = batch.kv_pool.layer_buffers(layer.layer_id)
        return kernels.attention(q, k_buf, v_buf, q_rows=seqs.q_rows, q_off=seqs.q_off, q_len=seqs.q_len,
                                 slots=seqs.slots, slot_off=seqs.slot_off, kv_len=seqs.kv_len, causal=seqs.causal,
                                 scale=layer.scaling, out=out, lse=lse, arith=self.arith)

    def forward_extend(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch) -> torch.Tensor:
        return self._forward(q, layer, batch)

    def forward_decode(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch) -> torch.Tensor:
        return self._forward(q, layer, batch)

    def _forward(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch) -> torch.Tensor:
        meta: _CpuMetadata = batch.attn_metadata
        if meta.prefixes is None:
            return self._attend(q, layer, batch, meta.main)
        rows, heads = q.shape[0], q.shape[1]
        lse_own = torch.empty((rows, heads), dtype=torch.float32)
        out = self._attend(q, layer, batch, meta.main, lse=lse_own)
        lse_prefix = torch.empty((rows, heads), dtype=torch.float32)
        out_prefix = self._attend(q, layer, batch, meta.prefixes, lse=lse_prefix)
        r = meta.cascade_rows
        out[r] = _merge(out_prefix[r], lse_prefix[r], out[r], lse_own[r])
        return out


def _index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _merge(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """One softmax attention from two over disjoint key sets, by their log-sum-exps ([n, H] each)."""
    lse = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (o_a * w_a + o_b * w_b) / (w_a + w_b)
