"""The split-KV (flash-decoding) decode kernel, in two stages.

Stage 1: one program per (request, KV head, split). It loads the query heads that share that KV
head (GQA: K and V are read once for the whole group and the scores are one small matrix product),
walks its split of the request's KV through the `req_to_token` row, and writes the normalised
partial output and its log-sum-exp (base 2). Stage 2: one program per (request, query head)
merges the splits. With a single split (large batches) stage 1 writes the output itself and stage 2
is not launched.

The grid depends only on the batch size (`max_splits` is a host value fixed per batch size); the
number of splits a request really uses is computed inside both kernels from its device-side
`seq_len`. So a CUDA graph captured at one batch size replays correctly for any lengths.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
MAX_SPLITS = 32


@triton.jit
def _num_splits(seq_len, MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(splits used, tokens per split) for one request; both kernels must agree on it.
    A split is a whole number of blocks, so short requests use few splits."""
    want = tl.minimum(tl.cdiv(seq_len, BLOCK_N), MAX_SPLITS)
    split_len = tl.cdiv(tl.cdiv(seq_len, want), BLOCK_N) * BLOCK_N
    return tl.cdiv(seq_len, split_len), split_len


@triton.jit
def _decode_stage1_kernel(
    Q, K_pool, V_pool, Partial_out, Partial_lse, Out,
    req_to_token, req_pool_indices, seq_lens,
    stride_q_req, stride_q_head,
    stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    stride_po_req, stride_po_head, stride_po_split,
    stride_pl_req, stride_pl_head,
    stride_o_req, stride_o_head,
    stride_r2t,
    QK_SCALE,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
    DIRECT: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + req).to(tl.int32)
    num_splits, split_len = _num_splits(seq_len, MAX_SPLITS, BLOCK_N)
    if split >= num_splits:
        return
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    row = tl.load(req_pool_indices + req).to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + req * stride_q_req + heads[:, None] * stride_q_head + offs_d[None, :], mask=mask_h[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    r2t_row = req_to_token + row * stride_r2t
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < end
        slots = tl.load(r2t_row + cols, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K_pool + slots[:, None] * stride_k_slot + kv_head * stride_k_head + offs_d[None, :]).to(q.dtype)
        v = tl.load(V_pool + slots[:, None] * stride_v_slot + kv_head * stride_v_head + offs_d[None, :]).to(q.dtype)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(mask_n[None, :], qk * QK_SCALE, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every block has a valid column
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if DIRECT:  # one split: this is the whole output, no merge stage
        o = Out + req * stride_o_req + heads[:, None] * stride_o_head + offs_d[None, :]
        tl.store(o, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=mask_h[:, None])
        return
    po = Partial_out + req * stride_po_req + heads[:, None] * stride_po_head + split * stride_po_split + offs_d[None, :]
    tl.store(po, acc / l_i[:, None], mask=mask_h[:, None])
    tl.store(Partial_lse + req * stride_pl_req + heads * stride_pl_head + split, m_i + tl.math.log2(l_i), mask=mask_h)


@triton.jit
def _decode_stage2_kernel(
    Partial_out, Partial_lse, Out, seq_lens,
    stride_po_req, stride_po_head, stride_po_split,
    stride_pl_req, stride_pl_head,
    stride_o_req, stride_o_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens + req).to(tl.int32)
    num_splits, _ = _num_splits(seq_len, MAX_SPLITS, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(Partial_lse + req * stride_pl_req + head * stride_pl_head + offs_s, mask=mask_s, other=float("-inf"))
    weight = tl.math.exp2(lse - tl.max(lse, 0))  # empty splits weigh 0
    partial = tl.load(
        Partial_out + req * stride_po_req + head * stride_po_head + offs_s[:, None] * stride_po_split + offs_d[None, :],
        mask=mask_s[:, None],
        other=0.0,
    )
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(Out + req * stride_o_req + head * stride_o_head + offs_d, out.to(Out.dtype.element_ty))


class DecodeConfig(NamedTuple):
    max_splits: int  # cap on KV splits per request (a power of two)
    block_n: int  # KV tokens per loop step; also the split granularity
    num_stages: int = 2  # software-pipelining depth of the K/V loads


@functools.cache
def decode_config(batch_size: int, num_kv_heads: int, head_dim: int, kv_bytes: int, num_sms: int,
                  smem_bytes: int) -> DecodeConfig:
    """The launch shape for a batch size. Depends only on host constants, so it is fixed per
    captured batch size. Measured on an H200 (docs/gpu-kernels.md):

    - splits: enough (request, KV head, split) programs to fill the SMs about twice; four times
      was slower at batch 8 to 64, one split per request is best from batch 64 up.
    - block_n: 64 while there are few programs (more of them fit on an SM at once); 128 once there
      are several per SM (batch 128 and 256: 3-5% faster), if two stages of K and V fit in
      shared memory.
    - 8-bit KV (`kv_bytes` 1; measured on an H100): block_n 64 with three load stages everywhere. With
      half the bytes per block, two stages leave the loads exposed: at batch 64 x 1024 three stages
      took 61.9 us against 98.5 us, at batch 128 117 us against 122 us (block_n 128, two stages).
    """
    programs = batch_size * num_kv_heads
    want = triton.cdiv(2 * num_sms, programs)
    max_splits = min(MAX_SPLITS, triton.next_power_of_2(max(1, want)))
    if kv_bytes == 1:
        return DecodeConfig(max_splits, 64, 3)
    block_n = 64
    if programs >= 4 * num_sms and 2 * 2 * 128 * head_dim * kv_bytes + 8192 <= smem_bytes:
        block_n = 128
    return DecodeConfig(max_splits, block_n)


def smem_bytes(device: torch.device) -> int:
    """Shared memory one program may use on `device` (the interpreter has no limit)."""
    if device.type != "cuda":
        return 1 << 20
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 96 << 10


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sm_scale: float,
    max_splits: int,
    out: torch.Tensor | None = None,
    partial_out: torch.Tensor | None = None,
    partial_lse: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """One query token per request over `req_to_token[req_pool_indices[i], :seq_lens[i]]`.

    q: [batch_size, num_heads, head_dim]; k_pool, v_pool: [num_slots + 1, num_kv_heads, head_dim];
    seq_lens: [batch_size] (device; never read on the host). Returns [batch_size, num_heads, head_dim].
    `partial_out` [batch_size, num_heads, max_splits, head_dim] and `partial_lse` [batch_size, num_heads,
    max_splits] (float32) are scratch; pass them to reuse buffers across layers.
    """
    batch_size, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = num_heads // num_kv_heads
    assert num_heads % num_kv_heads == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    assert max_splits & (max_splits - 1) == 0 and max_splits <= MAX_SPLITS
    for t in (q, k_pool, v_pool, req_to_token):
        assert t.stride(-1) == 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if partial_out is None:
        partial_out = torch.empty((batch_size, num_heads, max_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch_size, num_heads, max_splits), dtype=torch.float32, device=q.device)
    assert partial_out.shape == (batch_size, num_heads, max_splits, head_dim)
    assert partial_lse is not None and partial_lse.shape == (batch_size, num_heads, max_splits)
    direct = max_splits == 1
    _decode_stage1_kernel[(batch_size, num_kv_heads, max_splits)](
        q, k_pool, v_pool, partial_out, partial_lse, out,
        req_to_token, req_pool_indices, seq_lens,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        sm_scale * _LOG2E,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot needs at least 16 rows
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        MAX_SPLITS=max_splits,
        IEEE=q.dtype == torch.float32,
        DIRECT=direct,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if direct:
        return out
    _decode_stage2_kernel[(batch_size, num_heads)](
        partial_out, partial_lse, out, seq_lens,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        MAX_SPLITS=max_splits,
        BLOCK_S=max(2, max_splits),
        num_warps=4,
    )
    return out
