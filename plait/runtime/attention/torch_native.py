"""The reference attention backend: gather KV through `req_to_token`, then PyTorch SDPA.

Works on CPU and any GPU. Every other backend is tested against this one.
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
    kv_indices: list[torch.Tensor]  # per request: [seq_len] slots, prefix then new tokens
    masks: list[torch.Tensor | None]  # per request: [extend_len, seq_len] bool, None = plain causal


@dataclass
class _DecodeMetadata:
    kv_indices: torch.Tensor  # [batch_size, max_len] slots, padded with the dummy slot 0
    mask: torch.Tensor | None  # [batch_size, 1, 1, max_len] bool; None when no padding


class TorchNativeBackend(AttentionBackend):
    def __init__(self, **_: object):
        pass

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        req_to_token = batch.req_to_token_pool.req_to_token
        if batch.mode is ForwardMode.DECODE:
            max_len = max(batch.seq_lens_cpu)
            kv_indices = req_to_token[batch.req_pool_indices, :max_len]
            mask = None
            if min(batch.seq_lens_cpu) != max_len:
                valid = torch.arange(max_len, device=kv_indices.device)[None, :] < batch.seq_lens[:, None]
                kv_indices = torch.where(valid, kv_indices, torch.zeros_like(kv_indices))
                mask = valid[:, None, None, :]
            batch.attn_metadata = _DecodeMetadata(kv_indices, mask)
            return
        q_starts, kv_indices, masks = [], [], []
        q_start = 0
        rows = batch.req_pool_indices.tolist()
        for row, prefix_len, extend_len in zip(rows, batch.prefix_lens_cpu, batch.extend_lens_cpu):
            seq_len = prefix_len + extend_len
            q_starts.append(q_start)
            kv_indices.append(req_to_token[row, :seq_len])
            if prefix_len == 0:
                masks.append(None)
            else:
                # The queries sit at the end of the key range: query i sees keys [0, prefix_len + i].
                q_pos = torch.arange(extend_len, device=req_to_token.device)[:, None] + prefix_len
                masks.append(torch.arange(seq_len, device=req_to_token.device)[None, :] <= q_pos)
            q_start += extend_len
        batch.attn_metadata = _ExtendMetadata(q_starts, kv_indices, masks)

    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", batch: ForwardBatch) -> torch.Tensor:
        meta: _ExtendMetadata = batch.attn_metadata
        k_buf = batch.kv_pool.k_buffers[layer.layer_id]
        v_buf = batch.kv_pool.v_buffers[layer.layer_id]
        out = torch.empty_like(q)
        for q_start, extend_len, kv_idx, mask in zip(
            meta.q_starts, batch.extend_lens_cpu, meta.kv_indices, meta.masks
        ):
            q_i = q[q_start : q_start + extend_len].transpose(0, 1).unsqueeze(0)  # [1, num_heads, extend_len, head_dim]
            # index_select: several times faster than advanced indexing on CPU
            k_i = k_buf.index_select(0, kv_idx).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, num_kv_heads, seq_len, head_dim]
            v_i = v_buf.index_select(0, kv_idx).transpose(0, 1).unsqueeze(0).to(q.dtype)
            o_i = F.scaled_dot_product_attention(
                q_i, k_i, v_i, attn_mask=mask, is_causal=mask is None, scale=layer.scaling,
                enable_gqa=layer.num_heads != layer.num_kv_heads,
            )
            out[q_start : q_start + extend_len] = o_i.squeeze(0).transpose(0, 1)
        return out

    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", batch: ForwardBatch) -> torch.Tensor:
        meta: _DecodeMetadata = batch.attn_metadata
        k_buf = batch.kv_pool.k_buffers[layer.layer_id]
        v_buf = batch.kv_pool.v_buffers[layer.layer_id]
        shape = (*meta.kv_indices.shape, *k_buf.shape[1:])
        flat = meta.kv_indices.reshape(-1)
        k = k_buf.index_select(0, flat).view(shape)  # [batch_size, max_len, num_kv_heads, head_dim]
        v = v_buf.index_select(0, flat).view(shape)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [batch_size, num_heads, 1, head_dim]
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=meta.mask,
            scale=layer.scaling,
            enable_gqa=layer.num_heads != layer.num_kv_heads,
        )
        return o.squeeze(2)  # [batch_size, num_heads, head_dim]
