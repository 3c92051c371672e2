"""Fused Triton kernels for the elementwise parts of a decoder layer, used on CUDA only.

Each replaces several PyTorch kernels (and their round trips through device memory) with one:
RMSNorm with the residual add, SiLU-and-mul, and rotary embedding applied in place to q and k
(optionally storing the rotated k and v into the KV pool in the same kernel).
Each rounds where the PyTorch path in norm.py / activation.py / rotary.py rounds, so the two agree
to within a bf16 ulp or so. The layers call these for CUDA tensors and keep their own `forward_native`
(PyTorch) path for everything else, which the GPU tests use as the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# -- RMSNorm (+ residual) -----------------------------------------------------------------------


@triton.jit
def _rmsnorm_kernel(
    X, Residual, Weight, Out, Residual_out,
    stride_x, stride_r, stride_o, stride_ro,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the activation dtype first, as `x + residual` is in PyTorch.
        x = (x.to(tl.float32) + tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(Residual_out + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=mask)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or with `residual`: (norm(x + residual), x + residual). x: [num_tokens, hidden_size]."""
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.is_contiguous()
    num_rows, n_cols = x.shape
    out = torch.empty((num_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else out
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1 and residual.dtype == x.dtype
    block = triton.next_power_of_2(n_cols)
    _rmsnorm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out, residual_out,
        x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0), residual_out.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out if residual is None else (out, residual_out)


# -- SiLU-and-mul ---------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype).to(tl.float32)  # F.silu rounds here
    tl.store(Out + row * stride_o + cols, (act * up.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * intermediate] laid out [gate | up] -> silu(gate) * up."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0
    num_rows, n_cols = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, n_cols), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n_cols))
    _silu_and_mul_kernel[(num_rows, triton.cdiv(n_cols, block))](
        x, out, x.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4
    )
    return out


# -- rotary embedding, in place -------------------------------------------------------------------


@triton.jit
def _rotary_kernel(
    Q, K, Positions, Table,
    V, K_cache, V_cache, Cache_loc,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_table,
    stride_v_tok, stride_v_head, stride_kc_tok, stride_kc_head, stride_vc_tok, stride_vc_head,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    HALF_DIM: tl.constexpr,
    STORE_KV: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF_DIM)
    cos = tl.load(Table + pos * stride_table + offs_d)[None, :]
    sin = tl.load(Table + pos * stride_table + HALF_DIM + offs_d)[None, :]

    heads = tl.arange(0, BLOCK_QH)
    ptr = Q + tok * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :]
    mask = heads[:, None] < NUM_Q_HEADS
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF_DIM, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(ptr + HALF_DIM, (b * cos + a * sin).to(x1.dtype), mask=mask)

    heads = tl.arange(0, BLOCK_KH)
    ptr = K + tok * stride_k_tok + heads[:, None] * stride_k_head + offs_d[None, :]
    mask = heads[:, None] < NUM_K_HEADS
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF_DIM, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    k1 = (a * cos - b * sin).to(x1.dtype)
    k2 = (b * cos + a * sin).to(x1.dtype)
    tl.store(ptr, k1, mask=mask)
    tl.store(ptr + HALF_DIM, k2, mask=mask)
    if STORE_KV:
        # The token's KV slot: the rotated k and the untouched v go straight into the pool.
        slot = tl.load(Cache_loc + tok).to(tl.int64)
        cache = K_cache + slot * stride_kc_tok + heads[:, None] * stride_kc_head + offs_d[None, :]
        tl.store(cache, k1.to(K_cache.dtype.element_ty), mask=mask)
        tl.store(cache + HALF_DIM, k2.to(K_cache.dtype.element_ty), mask=mask)
        src = V + tok * stride_v_tok + heads[:, None] * stride_v_head + offs_d[None, :]
        dst = V_cache + slot * stride_vc_tok + heads[:, None] * stride_vc_head + offs_d[None, :]
        tl.store(dst, tl.load(src, mask=mask).to(V_cache.dtype.element_ty), mask=mask)
        tl.store(dst + HALF_DIM, tl.load(src + HALF_DIM, mask=mask).to(V_cache.dtype.element_ty), mask=mask)


def rotary_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_table: torch.Tensor,
    *,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    cache_loc: torch.Tensor | None = None,
) -> None:
    """Rotate q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim] in place
    (half-split layout) at `positions`, reading cos/sin from `cos_sin_table` [max_position, head_dim]
    ([cos | sin] halves, float32).

    With `v`, `k_cache`, `v_cache` ([num_slots, num_kv_heads, head_dim]) and `cache_loc` ([num_tokens]
    slot ids), the same kernel also stores the rotated k and v into the KV pool: the KV store costs
    no launch of its own.
    """
    num_tokens, num_heads, head_dim = q.shape
    half = head_dim // 2
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and q.stride(-1) == 1 and k.stride(-1) == 1
    assert half & (half - 1) == 0, "the fused rotary kernel needs a power-of-two head_dim"
    assert cos_sin_table.is_contiguous() and cos_sin_table.shape[1] == head_dim
    store = v is not None
    if store:
        assert k_cache is not None and v_cache is not None and cache_loc is not None
        assert v.shape == k.shape and v.stride(-1) == 1 and cache_loc.shape == (num_tokens,)
        assert k_cache.shape[1:] == k.shape[1:] and v_cache.shape[1:] == k.shape[1:]
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    else:
        v, k_cache, v_cache, cache_loc = k, k, k, positions  # unused by the kernel
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_table,
        v, k_cache, v_cache, cache_loc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_table.stride(0),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_Q_HEADS=num_heads,
        NUM_K_HEADS=k.shape[1],
        BLOCK_QH=max(2, triton.next_power_of_2(num_heads)),
        BLOCK_KH=max(2, triton.next_power_of_2(k.shape[1])),
        HALF_DIM=half,
        STORE_KV=store,
        num_warps=4,
    )
