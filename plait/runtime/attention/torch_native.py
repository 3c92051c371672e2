"""The reference attention backend: gather KV through `req_to_token`, then PyTorch SDPA.

Works on CPU and any GPU. Every other backend is tested against this one.

Decode has one refinement that matters on the CPU, where gathering each request's whole KV every
layer is most of a decode step: requests whose `req_to_token` rows start with the same slots share
that prefix in the radix cache, so their prefix is gathered once per group and attended by all the
group's queries in one matrix product (cascade attention). Each request then attends its own
suffix, and the two partial results are merged through their log-sum-exp. The result is the same
softmax over the same keys, in a different summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from plait.runtime.attention.base import AttentionBackend
from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from plait.runtime.layers.attention import RadixAttention


@dataclass
class _ExtendMetadata:
    q_starts: list[int]  # offset of each request's new tokens in the flat batch
    # Per request: the slots it attends itself (after its group's shared prefix, if it is in one),
    # and an additive mask [extend_len, keys] (0 or -inf) in the pool's dtype; None = plain causal.
    kv_indices: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    groups: list[_ExtendGroup]  # requests whose new tokens all attend one shared cached prefix
    group_of: list[int | None]  # per request: its index in `groups`, or None


@dataclass
class _ExtendGroup:
    members: list[int]
    rows: torch.Tensor  # the members' new tokens' rows in the flat batch, members in order
    prefix_slots: torch.Tensor  # [prefix_len]


# A group of decoding requests shares its prefix through the cascade path only when the prefix is
# at least this long: below it, one more padded gather costs less than a separate product per group.
CASCADE_MIN_PREFIX = 64


@dataclass
class _PaddedKV:
    rows: torch.Tensor | None  # positions in the batch these requests take; None = the whole batch in order
    kv_indices: torch.Tensor  # [n, max_len] slots, padded with the dummy slot 0
    mask: torch.Tensor | None  # [n, max_len] bool; None when no padding
    bias: torch.Tensor | None = None  # the mask as [n, 1, 1, max_len] additive 0 / -inf, for the cascade path


@dataclass
class _SharedPrefixes:
    """The groups of the cascade path, padded to one shape so that all are attended in one product."""

    slots: torch.Tensor  # [groups, max_prefix] the slots each group's members start with (dummy-padded)
    mask: torch.Tensor | None  # [groups, max_prefix] bool; None when every prefix has the same length
    queries: torch.Tensor  # [groups, max_members] positions in the suffix batch (padded with position 0)
    members: torch.Tensor  # [num_cascade] flat index into [groups * max_members]: each member's row


@dataclass
class _DecodeMetadata:
    plain: _PaddedKV | None  # requests attended over their whole KV
    suffix: _PaddedKV | None  # cascade requests: their KV after their group's shared prefix
    shared: _SharedPrefixes | None


class TorchNativeBackend(AttentionBackend):
    def __init__(self, **_: object):
        pass

    def kv_cache_dtypes(self, model_dtype: torch.dtype) -> set[torch.dtype]:
        # K/V are converted to the query's dtype as they are gathered.
        return {torch.float32, torch.bfloat16, torch.float16}

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        req_to_token = batch.req_to_token_pool.req_to_token
        if batch.mode is ForwardMode.DECODE:
            batch.attn_metadata = self._decode_metadata(batch)
            return
        batch.attn_metadata = self._extend_metadata(batch, req_to_token)

    def _extend_metadata(self, batch: ForwardBatch, req_to_token: torch.Tensor) -> _ExtendMetadata:
        device = req_to_token.device
        seq_lens = batch.seq_lens_cpu
        shared = []
        if batch.batch_size > 1 and max(batch.prefix_lens_cpu) >= CASCADE_MIN_PREFIX:
            kv_rows = req_to_token[batch.req_pool_indices, : max(seq_lens)]
            shared = self._shared_prefix_groups(kv_rows, seq_lens)
        starts = [0] * batch.batch_size
        group_of: list[int | None] = [None] * batch.batch_size
        q_starts = [0]
        for n in batch.extend_lens_cpu[:-1]:
            q_starts.append(q_starts[-1] + n)
        groups = []
        for g, (members, prefix_len) in enumerate(shared):
            rows = [torch.arange(q_starts[i], q_starts[i] + batch.extend_lens_cpu[i]) for i in members]
            slots = req_to_token[int(batch.req_pool_indices[members[0]]), :prefix_len]
            groups.append(_ExtendGroup(members, torch.cat(rows).to(device), slots))
            for i in members:
                starts[i], group_of[i] = prefix_len, g
        kv_indices, masks = [], []
        rows = batch.req_pool_indices.tolist()
        for row, start, prefix_len, seq_len in zip(rows, starts, batch.prefix_lens_cpu, seq_lens):
            kv_indices.append(req_to_token[row, start:seq_len])
            if prefix_len == start:
                masks.append(None)
            else:
                # The queries sit at the end of the key range: query i sees keys up to prefix_len + i.
                q_pos = torch.arange(seq_len - prefix_len, device=device)[:, None] + prefix_len
                visible = torch.arange(start, seq_len, device=device)[None, :] <= q_pos
                bias = torch.zeros(visible.shape, dtype=batch.kv_pool.dtype, device=device)
                masks.append(bias.masked_fill_(~visible, float("-inf")))
        return _ExtendMetadata(q_starts, kv_indices, masks, groups, group_of)

    def _decode_metadata(self, batch: ForwardBatch) -> _DecodeMetadata:
        req_to_token = batch.req_to_token_pool.req_to_token
        seq_lens = batch.seq_lens_cpu
        max_len = max(seq_lens)
        kv_rows = req_to_token[batch.req_pool_indices, :max_len]
        groups = self._shared_prefix_groups(kv_rows, seq_lens) if len(seq_lens) > 1 else []
        if not groups:
            return _DecodeMetadata(_padded(kv_rows, batch.seq_lens, None), None, None)
        device = kv_rows.device
        members, prefix_lens = [], []
        max_prefix = max(prefix_len for _, prefix_len in groups)
        max_members = max(len(group) for group, _ in groups)
        queries = torch.zeros((len(groups), max_members), dtype=torch.int64, device=device)
        member_rows = []
        for g, (group, prefix_len) in enumerate(groups):
            queries[g, : len(group)] = torch.arange(len(members), len(members) + len(group), device=device)
            member_rows.extend(range(g * max_members, g * max_members + len(group)))
            members.extend(group)
            prefix_lens.extend([prefix_len] * len(group))
        prefix_len_t = torch.tensor([prefix_len for _, prefix_len in groups], device=device)
        firsts = torch.tensor([group[0] for group, _ in groups], device=device)
        prefixes = _padded(kv_rows[firsts, :max_prefix], prefix_len_t, None)
        shared = _SharedPrefixes(
            prefixes.kv_indices, prefixes.mask, queries, torch.tensor(member_rows, device=device)
        )
        in_cascade = set(members)
        others = [i for i in range(len(seq_lens)) if i not in in_cascade]
        plain = None
        if others:
            rows = torch.tensor(others, device=device)
            plain = _padded(kv_rows[rows, : max(seq_lens[i] for i in others)], batch.seq_lens[rows], rows)
        rows = torch.tensor(members, device=device)
        starts = torch.tensor(prefix_lens, device=device)
        suffix_lens = batch.seq_lens[rows] - starts
        width = max(seq_lens[i] - p for i, p in zip(members, prefix_lens))
        cols = (starts[:, None] + torch.arange(width, device=device)[None, :]).clamp_(max=max_len - 1)
        suffix = _padded(kv_rows[rows].gather(1, cols), suffix_lens, rows, bias_dtype=batch.kv_pool.dtype)
        return _DecodeMetadata(plain, suffix, shared)

    @staticmethod
    def _shared_prefix_groups(kv_rows: torch.Tensor, seq_lens: list[int]) -> list[tuple[list[int], int]]:
        """Requests whose KV starts with the same slots, and how long the part all of them share is."""
        by_first: dict[int, list[int]] = {}
        for i, slot in enumerate(kv_rows[:, 0].tolist()):
            by_first.setdefault(slot, []).append(i)
        groups = []
        for group in by_first.values():
            if len(group) < 2:
                continue
            # Each request's newest slot is its own, so the shared part ends before the shortest's end.
            width = min(seq_lens[i] for i in group)
            if width <= CASCADE_MIN_PREFIX:
                continue
            block = kv_rows[group, :width]
            differs = (block != block[0]).any(0)
            prefix_len = int(differs.int().argmax()) if bool(differs.any()) else width - 1
            if prefix_len >= CASCADE_MIN_PREFIX:
                groups.append((group, prefix_len))
        return groups

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", batch: ForwardBatch) -> torch.Tensor:
        meta: _ExtendMetadata = batch.attn_metadata
        k_buf = batch.kv_pool.k_buffers[layer.layer_id]
        v_buf = batch.kv_pool.v_buffers[layer.layer_id]
        out = torch.empty_like(q)
        own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group members: output and lse, float32
        for i, (q_start, extend_len, kv_idx, mask) in enumerate(
            zip(meta.q_starts, batch.extend_lens_cpu, meta.kv_indices, meta.masks)
        ):
            q_i = q[q_start : q_start + extend_len].transpose(0, 1).unsqueeze(0)  # [1, num_heads, extend_len, head_dim]
            # index_select: several times faster than advanced indexing on CPU
            k_i = k_buf.index_select(0, kv_idx).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, num_kv_heads, keys, head_dim]
            v_i = v_buf.index_select(0, kv_idx).transpose(0, 1).unsqueeze(0).to(q.dtype)
            if mask is not None and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
            if meta.group_of[i] is not None:
                group = layer.num_heads // layer.num_kv_heads
                if group > 1:
                    k_i, v_i = k_i.repeat_interleave(group, dim=1), v_i.repeat_interleave(group, dim=1)
                o_i, lse_i = _attention_with_lse(q_i, k_i, v_i, None, layer.scaling, bias=mask, causal=mask is None)
                own[i] = (o_i.squeeze(0).transpose(0, 1), lse_i.squeeze(0).transpose(0, 1))
                continue
            o_i = F.scaled_dot_product_attention(
                q_i, k_i, v_i, attn_mask=mask, is_causal=mask is None, scale=layer.scaling,
                enable_gqa=layer.num_heads != layer.num_kv_heads,
            )
            out[q_start : q_start + extend_len] = o_i.squeeze(0).transpose(0, 1)
        for group in meta.groups:
            o_p, lse_p = _attend_prefix_rows(q[group.rows], k_buf, v_buf, group.prefix_slots, layer)
            o_s = torch.cat([own[i][0] for i in group.members])
            lse_s = torch.cat([own[i][1] for i in group.members])
            out[group.rows] = _merge(o_p, lse_p, o_s, lse_s).to(q.dtype)
        return out

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", batch: ForwardBatch) -> torch.Tensor:
        meta: _DecodeMetadata = batch.attn_metadata
        k_buf = batch.kv_pool.k_buffers[layer.layer_id]
        v_buf = batch.kv_pool.v_buffers[layer.layer_id]
        if meta.suffix is None:
            return self._decode_padded(q, k_buf, v_buf, meta.plain, layer)
        out = torch.empty_like(q)
        if meta.plain is not None:
            out[meta.plain.rows] = self._decode_padded(q[meta.plain.rows], k_buf, v_buf, meta.plain, layer)
        q_c = q[meta.suffix.rows]
        o_s, lse_s = _attend_with_lse(q_c, k_buf, v_buf, meta.suffix, layer)
        o_p, lse_p = _attend_shared_prefixes(q_c, k_buf, v_buf, meta.shared, layer)
        out[meta.suffix.rows] = _merge(o_p, lse_p, o_s, lse_s).to(q.dtype)
        return out

    @staticmethod
    def _decode_padded(
        q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, kv: _PaddedKV, layer: RadixAttention
    ) -> torch.Tensor:
        shape = (*kv.kv_indices.shape, *k_buf.shape[1:])
        flat = kv.kv_indices.reshape(-1)
        k = k_buf.index_select(0, flat).view(shape)  # [n, max_len, num_kv_heads, head_dim]
        v = v_buf.index_select(0, flat).view(shape)
        group = layer.num_heads // layer.num_kv_heads
        if _use_products(q, group):  # the G query heads of a KV head are one product's rows
            qg = q.view(q.shape[0], layer.num_kv_heads, group, q.shape[-1])
            out, _ = _attention_with_lse(qg, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                                         None if kv.mask is None else kv.mask[:, None, None, :], layer.scaling)
            return out.view(q.shape).to(q.dtype)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [n, num_heads, 1, head_dim]
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=None if kv.mask is None else kv.mask[:, None, None, :],
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return o.squeeze(2)  # [n, num_heads, head_dim]


def _padded(
    kv_rows: torch.Tensor, seq_lens: torch.Tensor, rows: torch.Tensor | None, bias_dtype: torch.dtype | None = None
) -> _PaddedKV:
    """Rows of slots cut at each request's length; the tail is pointed at the dummy slot and masked."""
    width = kv_rows.shape[1]
    valid = torch.arange(width, device=kv_rows.device)[None, :] < seq_lens[:, None]
    if bool(valid.all()):
        return _PaddedKV(rows, kv_rows, None)
    bias = None
    if bias_dtype is not None:
        bias = torch.zeros(valid.shape, dtype=bias_dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
        bias = bias[:, None, None, :]
    return _PaddedKV(rows, torch.where(valid, kv_rows, torch.zeros_like(kv_rows)), valid, bias)


def _attend_with_lse(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, kv: _PaddedKV, layer: RadixAttention
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per request over its padded KV: output [n, H, D] and log-sum-exp [n, H], in float32."""
    n, width = kv.kv_indices.shape
    kv_heads, group = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
    flat = kv.kv_indices.reshape(-1)
    k = k_buf.index_select(0, flat).view(n, width, kv_heads, -1).transpose(1, 2)  # [n, KV, W, D]
    v = v_buf.index_select(0, flat).view(n, width, kv_heads, -1).transpose(1, 2)
    qg = q.view(n, kv_heads, group, -1).to(k.dtype)  # query head h reads KV head h // group
    mask = None if kv.mask is None or kv.bias is not None else kv.mask[:, None, None, :]
    bias = None if kv.bias is None else kv.bias.to(k.dtype)
    out, lse = _attention_with_lse(qg, k, v, mask, layer.scaling, bias=bias)  # [n, KV, G, D], [n, KV, G]
    return out.reshape(n, layer.num_heads, -1), lse.reshape(n, layer.num_heads)


def _attend_shared_prefixes(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, shared: _SharedPrefixes, layer: RadixAttention
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's queries over the prefix the group shares: one product per (group, KV head)."""
    groups, width = shared.slots.shape
    members = shared.queries.shape[1]
    kv_heads, group = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
    head_dim = q.shape[-1]
    flat = shared.slots.reshape(-1)
    k = k_buf.index_select(0, flat).view(groups, width, kv_heads, head_dim).transpose(1, 2)  # [P, KV, L, D]
    v = v_buf.index_select(0, flat).view(groups, width, kv_heads, head_dim).transpose(1, 2)
    # [P, M, KV, G, D] -> [P, KV, M*G, D]: the rows of one product are all queries reading one KV head.
    qg = q[shared.queries].view(groups, members, kv_heads, group, head_dim).transpose(1, 2)
    qg = qg.reshape(groups, kv_heads, members * group, head_dim).to(k.dtype)
    mask = None if shared.mask is None else shared.mask[:, None, None, :]
    out, lse = _attention_with_lse(qg, k, v, mask, layer.scaling)
    out = out.view(groups, kv_heads, members, group, head_dim).transpose(1, 2).reshape(groups * members, -1, head_dim)
    lse = lse.view(groups, kv_heads, members, group).transpose(1, 2).reshape(groups * members, -1)
    return out[shared.members], lse[shared.members]


def _merge(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """One softmax attention from two over disjoint key sets, by their log-sum-exps ([..., H] each)."""
    lse = torch.maximum(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (o_a * w_a + o_b * w_b) / (w_a + w_b)


def _attend_prefix_rows(
    q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, layer: "RadixAttention"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [n, H, D] that all see the whole of one prefix: output [n, H, D] and lse [n, H] (float32)."""
    n, _, head_dim = q.shape
    kv_heads, group = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
    k = k_buf.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, KV, L, D]
    v = v_buf.index_select(0, slots).transpose(0, 1).unsqueeze(0)
    # The G query heads of one KV head become G times as many rows of one product: [1, KV, n*G, D].
    qg = q.view(n, kv_heads, group, head_dim).transpose(0, 1).reshape(1, kv_heads, n * group, head_dim)
    out, lse = _attention_with_lse(qg.to(k.dtype), k, v, None, layer.scaling)
    out = out.view(kv_heads, n, group, head_dim).transpose(0, 1).reshape(n, layer.num_heads, head_dim)
    return out, lse.view(kv_heads, n, group).transpose(0, 1).reshape(n, layer.num_heads)


def _attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    bias: torch.Tensor | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T) v and the log-sum-exp of the scaled scores, both float32.

    q: [..., Lq, D]; k, v: [..., Lk, D]; mask: bool, broadcastable to [..., Lq, Lk], True = attend;
    or `bias`, additive (0 / -inf) in q's dtype; or `causal` (Lq == Lk). On the CPU this is
    PyTorch's flash-attention kernel, which returns the log-sum-exp, except for decode-sized products
    in half precision (`_use_products`); elsewhere plain operations.
    """
    if q.device.type == "cpu" and _CPU_FLASH is not None and q.dim() == 4 and not _use_products(q, q.shape[-2]):
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = _CPU_FLASH(q, k, v, is_causal=causal, attn_mask=bias, scale=scale)
        return out.float(), lse
    # Plain operations: scores in float32 (from one rounding of the product in q's dtype), the softmax
    # weights rounded to v's dtype for the second product.
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    if causal:
        lq, lk = scores.shape[-2:]
        scores.masked_fill_(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    if bias is not None:
        scores.add_(bias)
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights.to(v.dtype), v).float().div_(total)
    return out, (top + total.log()).squeeze(-1)


def _use_products(q: torch.Tensor, rows: int) -> bool:
    """Whether attention with `rows` query rows per product runs faster as two matrix products than
    through PyTorch's fused kernels. On the CPU in bf16/fp16, for decode-sized products (up to 64 rows:
    a decode query's heads, or a group's queries over its shared prefix), the fused kernels were 1.3-15x
    slower than the products (2-core AVX-512 machine, docs/performance-cpu.md); in float32 they win or tie."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and rows <= 64


# PyTorch's CPU flash attention, which also returns the log-sum-exp the cascade merge needs.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
