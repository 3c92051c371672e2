"""The GPU attention backend: Triton kernels that read KV straight from the token pool.

Extend steps run one kernel over all requests (prefix gathered through `req_to_token`, new tokens
read from this step's K/V); decode steps run the two-stage split-KV kernel. Neither builds a
`kv_indices` array: the kernels index `req_to_token` rows themselves, so the metadata is a few
small tensors and decode steps can be captured into CUDA graphs (see the hooks below).

Decode steps in which the scheduler found requests sharing a cached prefix
(`ForwardBatch.shared_prefixes`) run eager with one more kernel, which reads each group's prefix once
for all its members; each request's own part then runs through stage 1 from where the prefix ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from plait.runtime.attention.base import AttentionBackend
from plait.runtime.attention.triton_ops import (
    SHARED_STEP_BLOCK_N,
    SHARED_STEP_SPLITS,
    SharedPrefixes,
    decode_attention,
    decode_config,
    extend_attention,
    shared_prefix_plan,
    shared_step_stages,
    smem_bytes,
    warm_up_shared_prefix_decode,
)
from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from plait.runtime.layers.attention import RadixAttention


@dataclass
class _ExtendMetadata:
    qo_indptr: torch.Tensor  # [batch_size + 1] int32: offset of each request's new tokens
    prefix_lens: torch.Tensor  # [batch_size] int32
    max_extend_len: int


@dataclass
class _DecodeMetadata:
    req_pool_indices: torch.Tensor  # [batch_size] int64
    seq_lens: torch.Tensor  # [batch_size] int64, read only by the kernels
    batch_size: int
    # Shared-prefix groups of the step (ForwardBatch.shared_prefixes), planned by the first layer.
    shared_groups: list[tuple[list[int], int]] | None = None
    req_pool_indices_cpu: list[int] | None = None
    shared: SharedPrefixes | None = field(default=None, repr=False)
    # Split-KV scratch, made by the first layer of the step and reused by the others:
    # [batch_size, num_heads, max_splits, head_dim] and [batch_size, num_heads, max_splits] float32.
    partial_out: torch.Tensor | None = field(default=None, repr=False)
    partial_lse: torch.Tensor | None = field(default=None, repr=False)


class TritonBackend(AttentionBackend):
    supports_cuda_graph = True
    stores_kv_with_rotary = True
    supports_fp8_kv_cache = True
    supports_shared_prefix_decode = True

    def __init__(self, device: torch.device | str = "cuda", **_: object):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:  # the Triton interpreter (tests on CPU)
            self.num_sms = 2
        self.smem_bytes = smem_bytes(self.device)
        self._graph_req_pool_indices: torch.Tensor | None = None
        self._graph_seq_lens: torch.Tensor | None = None
        # The captured metadata per batch size: kept alive with the backend because the graphs
        # hold the addresses of its scratch buffers.
        self._graph_metadata: dict[int, _DecodeMetadata] = {}

    # -- per step -------------------------------------------------------------------------------

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE:
            batch.attn_metadata = _DecodeMetadata(batch.req_pool_indices, batch.seq_lens, batch.batch_size)
            if batch.shared_prefixes:
                batch.attn_metadata.shared_groups = batch.shared_prefixes
                assert batch.req_pool_indices_cpu is not None, "shared prefixes need the rows on the host"
                batch.attn_metadata.req_pool_indices_cpu = batch.req_pool_indices_cpu
            return
        qo_indptr = [0]
        for extend_len in batch.extend_lens_cpu:
            qo_indptr.append(qo_indptr[-1] + extend_len)
        device = batch.req_pool_indices.device
        batch.attn_metadata = _ExtendMetadata(
            qo_indptr=torch.tensor(qo_indptr, dtype=torch.int32).to(device, non_blocking=True),
            prefix_lens=torch.tensor(batch.prefix_lens_cpu, dtype=torch.int32).to(device, non_blocking=True),
            max_extend_len=max(batch.extend_lens_cpu),
        )

    def forward_extend_with_new_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, batch: ForwardBatch
    ) -> torch.Tensor:
        # The new tokens' K/V are read from the projections (contiguous) rather than gathered back.
        return self._extend(q, k, v, layer, batch)

    def forward_extend(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch) -> torch.Tensor:
        k_buf = batch.kv_pool.k_buffers[layer.layer_id]
        v_buf = batch.kv_pool.v_buffers[layer.layer_id]
        return self._extend(q, k_buf[batch.out_cache_loc], v_buf[batch.out_cache_loc], layer, batch)

    def _extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, batch: ForwardBatch
    ) -> torch.Tensor:
        meta: _ExtendMetadata = batch.attn_metadata
        return extend_attention(
            q, k, v,
            batch.kv_pool.k_buffers[layer.layer_id],
            batch.kv_pool.v_buffers[layer.layer_id],
            batch.req_to_token_pool.req_to_token,
            batch.req_pool_indices,
            meta.prefix_lens,
            meta.qo_indptr,
            max_extend_len=meta.max_extend_len,
            sm_scale=layer.scaling,
        )

    def forward_decode(self, q: torch.Tensor, layer: RadixAttention, batch: ForwardBatch) -> torch.Tensor:
        # q: [batch_size, num_heads, head_dim]
        meta: _DecodeMetadata = batch.attn_metadata
        k_buf = batch.kv_pool.k_buffers[layer.layer_id]
        if meta.shared_groups is not None:
            max_splits, block_n = SHARED_STEP_SPLITS, SHARED_STEP_BLOCK_N
            num_stages = shared_step_stages(k_buf.element_size())
            if meta.shared is None:
                meta.shared = shared_prefix_plan(
                    meta.shared_groups, meta.req_pool_indices_cpu, num_heads=layer.num_heads,
                    num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim, num_sms=self.num_sms, device=q.device,
                )
        else:
            max_splits, block_n, num_stages = decode_config(
                meta.batch_size, layer.num_kv_heads, layer.head_dim, k_buf.element_size(), self.num_sms,
                self.smem_bytes,
            )
        if meta.partial_out is None or meta.partial_out.shape[1:] != (layer.num_heads, max_splits, layer.head_dim):
            meta.partial_out = torch.empty(
                (meta.batch_size, layer.num_heads, max_splits, layer.head_dim), dtype=torch.float32, device=q.device
            )
            meta.partial_lse = torch.empty(
                (meta.batch_size, layer.num_heads, max_splits), dtype=torch.float32, device=q.device
            )
        return decode_attention(
            q,
            k_buf,
            batch.kv_pool.v_buffers[layer.layer_id],
            batch.req_to_token_pool.req_to_token,
            meta.req_pool_indices,
            meta.seq_lens,
            sm_scale=layer.scaling,
            max_splits=max_splits,
            block_n=block_n,
            num_stages=num_stages,
            partial_out=meta.partial_out,
            partial_lse=meta.partial_lse,
            shared=meta.shared,
        )

    def warm_up(self, kv_pool, req_to_token: torch.Tensor, *, num_heads: int, dtype: torch.dtype) -> None:
        """Compile the kernels of steps that run eager with shared prefixes (the graphs compile the rest)."""
        warm_up_shared_prefix_decode(kv_pool.k_buffers[0], kv_pool.v_buffers[0], req_to_token, num_heads=num_heads,
                                     dtype=dtype, num_sms=self.num_sms)

    # -- CUDA graphs ----------------------------------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        # Filled with the padding values (row 0, length 1), so a warm-up or capture run before any
        # replay reads only the dummy slot.
        self._graph_req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self._graph_seq_lens = torch.ones(max_bs, dtype=torch.int64, device=self.device)

    def init_forward_metadata_capture_cuda_graph(self, batch: ForwardBatch) -> None:
        # Launches no device work, so it is safe inside or outside the capture context.
        assert batch.mode is ForwardMode.DECODE and self._graph_seq_lens is not None, "call init_cuda_graph_state first"
        bs = batch.batch_size
        assert bs <= self._graph_seq_lens.shape[0]
        meta = _DecodeMetadata(self._graph_req_pool_indices[:bs], self._graph_seq_lens[:bs], bs)
        self._graph_metadata[bs] = batch.attn_metadata = meta

    def init_forward_metadata_replay_cuda_graph(self, batch: ForwardBatch, bs: int) -> None:
        assert self._graph_seq_lens is not None, "call init_cuda_graph_state first"
        raw_bs = batch.batch_size
        assert raw_bs <= bs <= self._graph_seq_lens.shape[0]
        self._graph_req_pool_indices[:raw_bs].copy_(batch.req_pool_indices[:raw_bs], non_blocking=True)
        self._graph_seq_lens[:raw_bs].copy_(batch.seq_lens[:raw_bs], non_blocking=True)
        if raw_bs < bs:
            self._graph_req_pool_indices[raw_bs:bs].zero_()
            self._graph_seq_lens[raw_bs:bs].fill_(1)
