"""The extend kernel: each request's new tokens attend to its cached prefix and, causally, to themselves.

One program owns BLOCK_M new tokens of one request and one query head, and streams keys with an
online softmax in two passes: the prefix, gathered from the pool through the request's
`req_to_token` row (every new token sees all of it, so only the tail block is masked), then the new
tokens' own K/V read contiguously from this step's projections (causal, masked only on the diagonal
blocks). Scores are kept in base 2 (`exp2`, scale folded with log2(e)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(q, k, v, m_i, l_i, acc, mask, QK_SCALE, IEEE: tl.constexpr, MASKED: tl.constexpr):
    # q: [BLOCK_M, D]; k, v: [BLOCK_N, D]; mask: [BLOCK_M, BLOCK_N] (used only when MASKED)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * QK_SCALE
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row may be fully masked in its first block (m_new = -inf): keep exp2 away from inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(
    Q, K_new, V_new, K_pool, V_pool, Out,
    req_to_token, req_pool_indices, prefix_lens, qo_indptr,
    stride_q_tok, stride_q_head,
    stride_kn_tok, stride_kn_head, stride_vn_tok, stride_vn_head,
    stride_kp_slot, stride_kp_head, stride_vp_slot, stride_vp_head,
    stride_o_tok, stride_o_head,
    stride_r2t,
    QK_SCALE,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    head = tl.program_id(0)
    # The last query blocks carry the most causal work: start them first.
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    req = tl.program_id(2)
    q_start = tl.load(qo_indptr + req)
    extend_len = tl.load(qo_indptr + req + 1) - q_start
    m_start = m_block * BLOCK_M
    if m_start >= extend_len:
        return
    prefix_len = tl.load(prefix_lens + req)
    row = tl.load(req_pool_indices + req).to(tl.int64)
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < extend_len
    q_tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_tok[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :], mask=mask_m[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Pass 1: the cached prefix, gathered by slot id. Out-of-range keys read the dummy slot 0.
    r2t_row = req_to_token + row * stride_r2t
    for start_n in range(0, prefix_len, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < prefix_len
        slots = tl.load(r2t_row + cols, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K_pool + slots[:, None] * stride_kp_slot + kv_head * stride_kp_head + offs_d[None, :]).to(q.dtype)
        v = tl.load(V_pool + slots[:, None] * stride_vp_slot + kv_head * stride_vp_head + offs_d[None, :]).to(q.dtype)
        m_i, l_i, acc = _online_softmax_step(
            q, k.to(q.dtype), v.to(q.dtype), m_i, l_i, acc, mask_n[None, :], QK_SCALE, IEEE, True
        )

    # Pass 2: the new tokens themselves. Blocks wholly before this query block need no mask.
    kn_base = K_new + kv_head * stride_kn_head
    vn_base = V_new + kv_head * stride_vn_head
    for start_n in range(0, m_start, BLOCK_N):
        k_tok = (q_start + start_n + offs_n).to(tl.int64)
        k = tl.load(kn_base + k_tok[:, None] * stride_kn_tok + offs_d[None, :]).to(q.dtype)
        v = tl.load(vn_base + k_tok[:, None] * stride_vn_tok + offs_d[None, :]).to(q.dtype)
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, mask_m[:, None], QK_SCALE, IEEE, False)
    end_n = tl.minimum(m_start + BLOCK_M, extend_len)
    for start_n in range(m_start, end_n, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < extend_len
        k_tok = (q_start + cols).to(tl.int64)
        k = tl.load(kn_base + k_tok[:, None] * stride_kn_tok + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(q.dtype)
        v = tl.load(vn_base + k_tok[:, None] * stride_vn_tok + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(q.dtype)
        causal = (offs_m[:, None] >= cols[None, :]) & mask_n[None, :]
        m_i, l_i, acc = _online_softmax_step(q, k, v, m_i, l_i, acc, causal, QK_SCALE, IEEE, True)

    out = acc / l_i[:, None]
    tl.store(
        Out + q_tok[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None],
    )


def _extend_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size and dtype."""
    if dtype == torch.float32:
        return (32, 32, 4, 1) if head_dim > 64 else (64, 32, 4, 1)
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    qo_indptr: torch.Tensor,
    *,
    max_extend_len: int,
    sm_scale: float,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over prefix + themselves.

    q: [num_tokens, num_heads, head_dim]; k_new, v_new: [num_tokens, num_kv_heads, head_dim] (this
    step's K/V, requests concatenated); k_pool, v_pool: [num_slots + 1, num_kv_heads, head_dim];
    req_to_token: [rows, max_context_len]; req_pool_indices, prefix_lens: [batch_size];
    qo_indptr: [batch_size + 1] offsets of each request's new tokens. Returns [num_tokens, num_heads, head_dim].
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    assert num_heads % num_kv_heads == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    for t in (q, k_new, v_new, k_pool, v_pool, req_to_token):
        assert t.stride(-1) == 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_m, block_n, num_warps, num_stages = config or _extend_config(head_dim, q.dtype)
    batch_size = req_pool_indices.shape[0]
    grid = (num_heads, triton.cdiv(max_extend_len, block_m), batch_size)
    _extend_kernel[grid](
        q, k_new, v_new, k_pool, v_pool, out,
        req_to_token, req_pool_indices, prefix_lens, qo_indptr,
        q.stride(0), q.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        sm_scale * _LOG2E,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
