"""The attention backend interface.

A backend builds its index metadata once per step (`init_forward_metadata`) and then, for every
layer, stores the step's new K/V into the pool and attends over prefix + new tokens. Models never
see requests or slots: they call `RadixAttention.forward(q, k, v, batch)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from plait.runtime.layers.attention import RadixAttention


class AttentionBackend(ABC):
    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Build the per-step index tensors and store them in `batch.attn_metadata`."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: "RadixAttention", batch: ForwardBatch
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        # returns [num_tokens, num_heads, head_dim]
        batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        if batch.mode is ForwardMode.DECODE:
            return self.forward_decode(q, layer, batch)
        return self.forward_extend(q, layer, batch)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer: "RadixAttention", batch: ForwardBatch) -> torch.Tensor:
        """Causal attention of each request's new tokens over its prefix and themselves (KV already stored)."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer: "RadixAttention", batch: ForwardBatch) -> torch.Tensor:
        """One query token per request over its whole KV (already stored)."""


ATTENTION_BACKENDS: dict[str, str] = {
    "torch_native": "plait.runtime.attention.torch_native:TorchNativeBackend",
}


def create_attention_backend(name: str, **kwargs) -> AttentionBackend:
    import importlib

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}")
    module_name, cls_name = ATTENTION_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(**kwargs)
