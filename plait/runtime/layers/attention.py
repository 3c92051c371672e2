"""The attention layer models call: it owns the head geometry and defers to the step's backend."""

from __future__ import annotations

import torch
from torch import nn

from plait.runtime.executor.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    def __init__(self, *, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float):
        super().__init__()
        assert num_heads % num_kv_heads == 0
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, *, kv_stored: bool = False
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads * head_dim]; k, v: [num_tokens, num_kv_heads * head_dim]
        # kv_stored: the caller already wrote k and v at the batch's `out_cache_loc` (fused with rotary).
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = batch.attn_backend.forward(q, k, v, self, batch, save_kv=not kv_stored)
        return out.reshape(-1, self.num_heads * self.head_dim)
