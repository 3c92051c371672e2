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
    # Whether decode steps may be captured into CUDA graphs through the three hooks below.
    supports_cuda_graph: bool = False
    # Whether models may store a layer's new K/V themselves, fused with the rotary embedding, and call
    # `forward(..., save_kv=False)`: true where the backend reads new tokens' K/V only from the pool or
    # from the k/v it is passed (never from an earlier copy of its own).
    stores_kv_with_rotary: bool = False
    # Whether the KV pool may be stored in an 8-bit float type (`--kv-cache-dtype fp8_*`): the kernels
    # cast K/V to the query's dtype as they load them.
    supports_fp8_kv_cache: bool = False
    # Decode batches may carry `ForwardBatch.shared_prefixes`, which the backend then uses, when they
    # save at least this many KV tokens a step (unless --shared-prefix-decode-min-tokens says otherwise).
    supports_shared_prefix_decode: bool = False
    shared_prefix_min_saved_tokens: int = 16384
    # Extend batches may carry `ForwardBatch.shared_prefixes` too (same rule as decode).
    supports_shared_prefix_extend: bool = False

    def kv_cache_dtypes(self, model_dtype: torch.dtype) -> set[torch.dtype]:
        """KV pool dtypes this backend reads for a model computing in `model_dtype`."""
        dtypes = {model_dtype}
        if self.supports_fp8_kv_cache:
            dtypes |= {torch.float8_e5m2, torch.float8_e4m3fn}
        return dtypes

    def preferred_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype | None:
        """The KV dtype `--kv-cache-dtype auto` picks when the model dtype was chosen automatically
        too (None: the model's)."""
        return None

    def warm_up(self, kv_pool, req_to_token: torch.Tensor, *, num_heads: int, dtype: torch.dtype) -> None:
        """Called once the pools exist (on CUDA): compile what would otherwise compile mid-serving."""

    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Build the per-step index tensors and store them in `batch.attn_metadata`."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        batch: ForwardBatch,
        *,
        save_kv: bool = True,
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        # returns [num_tokens, num_heads, head_dim]
        if save_kv:
            batch.kv_pool.set_kv(layer.layer_id, batch.out_cache_loc, k, v)
        if batch.mode is ForwardMode.DECODE:
            return self.forward_decode(q, layer, batch)
        return self.forward_extend_with_new_kv(q, k, v, layer, batch)

    def forward_extend_with_new_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, batch: ForwardBatch
    ) -> torch.Tensor:
        """An extend step given the new tokens' K/V as well; backends that read them from here rather
        than back from the pool override this."""
        return self.forward_extend(q, layer, batch)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch) -> torch.Tensor:
        """Causal attention of each request's new tokens over its prefix and themselves (KV already stored)."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch) -> torch.Tensor:
        """One query token per request over its whole KV (already stored)."""


    # CUDA-graph hooks (decode only). Padded rows of a captured batch use req_pool_index 0 (the
    # padding row of req_to_token, whose entries are the dummy slot 0) and seq_len 1, so they attend
    # to the dummy slot alone and their outputs are finite garbage the caller drops.

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        """Allocate the static decode metadata buffers for up to `max_bs` rows, once, before capture."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_capture_cuda_graph(self, batch: ForwardBatch) -> None:
        """Set `batch.attn_metadata` for capturing a decode batch of `batch.batch_size` rows.

        The metadata must point at the static buffers and depend on no host value but the batch
        size, so that a replay with other requests and lengths runs the same kernels correctly.
        Called instead of `init_forward_metadata`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_replay_cuda_graph(self, batch: ForwardBatch, bs: int) -> None:
        """Refill the static buffers in place for `batch` (its `batch_size` <= bs real rows) before
        replaying the graph captured at size `bs`; rows past the real ones get the padding values.
        No host sync, no allocation."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")


ATTENTION_BACKENDS: dict[str, str] = {
    "torch_native": "plait.runtime.attention.torch_native:TorchNativeBackend",
    "triton": "plait.runtime.attention.triton_backend:TritonBackend",
    "cpu": "plait.runtime.attention.cpu_backend:CpuBackend",
}


def default_attention_backend(device: torch.device, *, cpu_kernels: bool = False) -> str:
    """`triton` on CUDA when Triton is installed (it ships with PyTorch's CUDA wheels); `cpu` when the
    model runs on the CPU kernels; else `torch_native`."""
    import importlib.util

    if device.type == "cuda":
        return "triton" if importlib.util.find_spec("triton") else "torch_native"
    return "cpu" if cpu_kernels else "torch_native"


def create_attention_backend(name: str, **kwargs) -> AttentionBackend:
    import importlib

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}")
    module_name, cls_name = ATTENTION_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(**kwargs)
