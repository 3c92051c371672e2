"""The split-KV (flash-decoding) decode kernel, in two stages.

Stage 1: one program per (request, KV head, split). It loads the query heads that share that KV
head (GQA: K and V are read once for the whole group and the scores are one small matrix product),
walks its split of the request's KV through the `req_to_token` row, and writes the normalised
partial output and its log-sum-exp (base 2). Stage 2: one program per (request, query head)
merges the splits. With a single split (large batches) stage 1 writes the output itself and stage 2
is not launched.

Shared prefixes (cascade decode): requests whose rows start with the same cached slots (the radix
cache's shared system prompt, say) can read that prefix once per group instead of once per request.
`_prefix_kernel` runs one program per (chunk of a group, KV head, prefix split), with the chunk's
members' query heads as the rows of one matrix product over each KV block; stage 1 then walks only
each request's own part of the row (from `kv_starts`), and stage 2 merges both sets of partial
results. This path runs eager (its grid follows the groups), never inside a CUDA graph.

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
MAX_PREFIX_SPLITS = 16
# The launch shape of stage 1 in steps with shared prefixes (eager steps: one shape, so its kernels
# are compiled once, at start-up, rather than once per batch size mid-serving).
SHARED_STEP_SPLITS, SHARED_STEP_BLOCK_N = 4, 64


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
    req_to_token, req_pool_indices, seq_lens, kv_starts,
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
    HAS_START: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + req).to(tl.int32)
    kv_start = 0
    if HAS_START:  # the request's first kv_start tokens are attended by _prefix_kernel
        kv_start = tl.load(kv_starts + req).to(tl.int32)
    num_splits, split_len = _num_splits(seq_len - kv_start, MAX_SPLITS, BLOCK_N)
    if split >= num_splits:
        return
    start = kv_start + split * split_len
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


@triton.jit(do_not_specialize=["prefix_splits"])
def _decode_stage2_kernel(
    Partial_out, Partial_lse, Out, seq_lens, kv_starts, Prefix_out, Prefix_lse, prefix_splits,
    stride_po_req, stride_po_head, stride_po_split,
    stride_pl_req, stride_pl_head,
    stride_o_req, stride_o_head,
    stride_xo_req, stride_xo_head, stride_xo_split,
    stride_xl_req, stride_xl_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_PREFIX: tl.constexpr,  # merge `prefix_splits` shared-prefix partials too
    BLOCK_P: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens + req).to(tl.int32)
    kv_start = 0
    if HAS_PREFIX:
        kv_start = tl.load(kv_starts + req).to(tl.int32)
    num_splits, _ = _num_splits(seq_len - kv_start, MAX_SPLITS, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(Partial_lse + req * stride_pl_req + head * stride_pl_head + offs_s, mask=mask_s, other=float("-inf"))
    partial = tl.load(
        Partial_out + req * stride_po_req + head * stride_po_head + offs_s[:, None] * stride_po_split + offs_d[None, :],
        mask=mask_s[:, None],
        other=0.0,
    )
    m = tl.max(lse, 0)  # finite: the request's own part holds at least its new token
    weight = tl.math.exp2(lse - m)  # empty splits weigh 0
    num = tl.sum(partial * weight[:, None], 0)
    den = tl.sum(weight, 0)
    if HAS_PREFIX:  # requests outside any group have -inf here (weight 0)
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < prefix_splits
        lse_p = tl.load(Prefix_lse + req * stride_xl_req + head * stride_xl_head + offs_p, mask=mask_p,
                        other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse_p, 0))
        scale = tl.math.exp2(m - m_new)
        weight_p = tl.math.exp2(lse_p - m_new)
        partial_p = tl.load(
            Prefix_out + req * stride_xo_req + head * stride_xo_head + offs_p[:, None] * stride_xo_split + offs_d[None, :],
            mask=mask_p[:, None],
            other=0.0,
        )
        num = num * scale + tl.sum(partial_p * weight_p[:, None], 0)
        den = den * scale + tl.sum(weight_p, 0)
    tl.store(Out + req * stride_o_req + head * stride_o_head + offs_d, (num / den).to(Out.dtype.element_ty))


@triton.jit(do_not_specialize=["prefix_splits"])
def _prefix_kernel(
    Q, K_pool, V_pool, Prefix_out, Prefix_lse,
    req_to_token, chunk_members, chunk_rows, chunk_prefix_lens, prefix_splits,
    stride_q_req, stride_q_head,
    stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    stride_xo_req, stride_xo_head, stride_xo_split,
    stride_xl_req, stride_xl_head,
    stride_r2t,
    QK_SCALE,
    GROUP: tl.constexpr,
    MEMBERS: tl.constexpr,  # member slots per chunk (padded with -1)
    BLOCK_M: tl.constexpr,  # >= MEMBERS * GROUP, a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One (chunk, KV head, split): the chunk's members' query heads of this KV head against one split
    of their shared prefix, read once. Row r of the tile is member r // GROUP, head r % GROUP."""
    chunk = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_len = tl.load(chunk_prefix_lens + chunk)
    row = tl.load(chunk_rows + chunk).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    member = offs_m // GROUP
    in_chunk = member < MEMBERS
    req = tl.load(chunk_members + chunk * MEMBERS + member, mask=in_chunk, other=-1)
    valid = req >= 0
    req = tl.where(valid, req, 0).to(tl.int64)
    heads = kv_head * GROUP + offs_m % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + req[:, None] * stride_q_req + heads[:, None] * stride_q_head + offs_d[None, :],
                mask=valid[:, None], other=0.0)

    split_len = tl.cdiv(tl.cdiv(prefix_len, prefix_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, prefix_len)
    # Stage 1's loop with BLOCK_M rows. A shared jit helper for the two was tried, but only checked in
    # the interpreter; this is the form measured and tested compiled on the GPU.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
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
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty split (a short prefix) writes weight 0: lse -inf and a zero output.
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    xo = Prefix_out + req[:, None] * stride_xo_req + heads[:, None] * stride_xo_head + split * stride_xo_split + offs_d[None, :]
    tl.store(xo, out, mask=valid[:, None])
    tl.store(Prefix_lse + req * stride_xl_req + heads * stride_xl_head + split, lse, mask=valid)


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


class SharedPrefixes(NamedTuple):
    """One decode step's shared-prefix plan (see `shared_prefix_plan`); the same for every layer."""

    members: torch.Tensor  # [num_chunks, members_per_chunk] int32: batch positions, padded with -1
    rows: torch.Tensor  # [num_chunks] int64: a req_to_token row that starts with the chunk's prefix
    prefix_lens: torch.Tensor  # [num_chunks] int32
    kv_starts: torch.Tensor  # [batch_size] int32: tokens the prefix kernel attends (0 outside any group)
    num_splits: int  # prefix splits per chunk (a power of two)
    block_n: int
    prefix_out: torch.Tensor  # [batch_size, num_heads, num_splits, head_dim] float32 scratch
    prefix_lse: torch.Tensor  # [batch_size, num_heads, num_splits] float32, -inf outside any group


def members_per_chunk(group: int) -> int:
    """Requests whose query heads share one prefix tile: 64 rows (16 requests at GQA 4), at least one."""
    return max(1, 64 // group)


def shared_prefix_plan(
    groups: list[tuple[list[int], int]],
    req_pool_indices: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_sms: int,
    device: torch.device,
) -> SharedPrefixes:
    """Chunks of `groups` ((batch positions, shared prefix length) each; a position in at most one
    group, the prefix shorter than each member's length) and the scratch of the prefix kernel."""
    batch_size = len(req_pool_indices)
    per_chunk = members_per_chunk(num_heads // num_kv_heads)
    members, rows, prefix_lens = [], [], []
    kv_starts = [0] * batch_size
    for positions, prefix_len in groups:
        for i in range(0, len(positions), per_chunk):
            chunk = positions[i : i + per_chunk]
            members.append(chunk + [-1] * (per_chunk - len(chunk)))
            rows.append(req_pool_indices[chunk[0]])
            prefix_lens.append(prefix_len)
        for pos in positions:
            assert kv_starts[pos] == 0, "a request in two groups"
            kv_starts[pos] = prefix_len
    programs = len(members) * num_kv_heads
    num_splits = min(MAX_PREFIX_SPLITS, max(2, triton.next_power_of_2(triton.cdiv(2 * num_sms, max(1, programs)))))
    block_n = 64
    num_splits = min(num_splits, max(2, triton.next_power_of_2(triton.cdiv(max(prefix_lens), block_n))))

    def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return SharedPrefixes(
        members=to_device(members, torch.int32),
        rows=to_device(rows, torch.int64),
        prefix_lens=to_device(prefix_lens, torch.int32),
        kv_starts=to_device(kv_starts, torch.int32),
        num_splits=num_splits,
        block_n=block_n,
        # Zeros, not empty: rows outside any group are never written, and the merge multiplies them by a
        # weight of 0, which a NaN left in uninitialised memory would survive.
        prefix_out=torch.zeros((batch_size, num_heads, num_splits, head_dim), dtype=torch.float32, device=device),
        prefix_lse=torch.full((batch_size, num_heads, num_splits), float("-inf"), dtype=torch.float32, device=device),
    )


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
    shared: SharedPrefixes | None = None,
) -> torch.Tensor:
    """One query token per request over `req_to_token[req_pool_indices[i], :seq_lens[i]]`.

    q: [batch_size, num_heads, head_dim]; k_pool, v_pool: [num_slots + 1, num_kv_heads, head_dim];
    seq_lens: [batch_size] (device; never read on the host). Returns [batch_size, num_heads, head_dim].
    `partial_out` [batch_size, num_heads, max_splits, head_dim] and `partial_lse` [batch_size, num_heads,
    max_splits] (float32) are scratch; pass them to reuse buffers across layers. With `shared`, the
    groups' prefixes are attended once per chunk of members and merged with each request's own part.
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
    ieee = q.dtype == torch.float32
    if shared is not None:
        per_chunk = shared.members.shape[1]
        assert shared.prefix_out.shape == (batch_size, num_heads, shared.num_splits, head_dim)
        xo, xl = shared.prefix_out, shared.prefix_lse
        _prefix_kernel[(shared.members.shape[0], num_kv_heads, shared.num_splits)](
            q, k_pool, v_pool, xo, xl,
            req_to_token, shared.members, shared.rows, shared.prefix_lens, shared.num_splits,
            q.stride(0), q.stride(1),
            k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
            xo.stride(0), xo.stride(1), xo.stride(2),
            xl.stride(0), xl.stride(1),
            req_to_token.stride(0),
            sm_scale * _LOG2E,
            GROUP=group,
            MEMBERS=per_chunk,
            BLOCK_M=max(16, triton.next_power_of_2(per_chunk * group)),
            HEAD_DIM=head_dim,
            BLOCK_N=shared.block_n,
            IEEE=ieee,
            num_warps=8,
            num_stages=2,
        )
    direct = max_splits == 1 and shared is None
    kv_starts = shared.kv_starts if shared is not None else seq_lens  # (unread without shared)
    _decode_stage1_kernel[(batch_size, num_kv_heads, max_splits)](
        q, k_pool, v_pool, partial_out, partial_lse, out,
        req_to_token, req_pool_indices, seq_lens, kv_starts,
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
        IEEE=ieee,
        DIRECT=direct,
        HAS_START=shared is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if direct:
        return out
    xo = shared.prefix_out if shared is not None else partial_out
    xl = shared.prefix_lse if shared is not None else partial_lse
    _decode_stage2_kernel[(batch_size, num_heads)](
        partial_out, partial_lse, out, seq_lens, kv_starts, xo, xl, xl.shape[2],
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        xo.stride(0), xo.stride(1), xo.stride(2),
        xl.stride(0), xl.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        MAX_SPLITS=max_splits,
        BLOCK_S=max(2, max_splits),
        HAS_PREFIX=shared is not None,
        BLOCK_P=MAX_PREFIX_SPLITS,
        num_warps=4,
    )
    return out


def warm_up_shared_prefix_decode(
    k_pool: torch.Tensor, v_pool: torch.Tensor, req_to_token: torch.Tensor, *, num_heads: int, dtype: torch.dtype,
    num_sms: int,
) -> None:
    """Compile the shared-prefix step's kernels for this model's shapes (two requests on the pool's
    dummy slot and req_to_token's padding row 0), so that the first such step mid-serving does not wait."""
    num_kv_heads, head_dim = k_pool.shape[1], k_pool.shape[2]
    device = k_pool.device
    q = torch.zeros((2, num_heads, head_dim), dtype=dtype, device=device)
    rows = torch.zeros(2, dtype=torch.int64, device=device)
    seq_lens = torch.full((2,), 2, dtype=torch.int64, device=device)
    shared = shared_prefix_plan([([0, 1], 1)], [0, 0], num_heads=num_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, num_sms=num_sms, device=device)
    decode_attention(q, k_pool, v_pool, req_to_token, rows, seq_lens, sm_scale=1.0, max_splits=SHARED_STEP_SPLITS,
                     block_n=SHARED_STEP_BLOCK_N, num_stages=shared_step_stages(k_pool.element_size()), shared=shared)


def shared_step_stages(kv_bytes: int) -> int:
    return 3 if kv_bytes == 1 else 2
