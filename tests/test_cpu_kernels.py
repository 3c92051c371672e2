"""Plait's CPU kernels besides the products, against PyTorch references: the small fused layers, rotary
+ KV store, and attention over slot lists of the pool (causal, split along the keys, every KV dtype,
log-sum-exps). The products are in test_cpu_products.py."""

from __future__ import annotations

import pytest
import torch

from plait.runtime.cpu import kernels
from plait.runtime.layers.activation import SiluAndMul
from plait.runtime.layers.norm import RMSNorm
from plait.runtime.layers.rotary import RotaryEmbedding, apply_rotary_native
from tests.cpu_weights import needs_kernels, rel_err

@needs_kernels
def test_rmsnorm_and_silu_match_the_reference_layers():
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96)
    x, residual = torch.randn(5, 96), torch.randn(5, 96)
    ref_out, ref_residual = norm.forward_native(x, residual.clone())
    ours_residual = residual.clone()
    out = kernels.rmsnorm(x, norm.weight, 1e-5, residual=ours_residual)
    assert rel_err(out, ref_out) < 1e-6 and torch.allclose(ours_residual, ref_residual)
    assert rel_err(kernels.rmsnorm(x, norm.weight, 1e-5), norm.forward_native(x)) < 1e-6
    gate_up = torch.randn(4, 2 * 200) * 6  # large magnitudes: exp's range ends
    assert rel_err(kernels.silu_mul(gate_up), SiluAndMul().forward_native(gate_up)) < 1e-6


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels' int8 pool rows of float rows x [..., D]: D codes (round(x / scale)) and the row's
    float32 scale max|x| / 127 as 4 more bytes."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(x / scale).to(torch.int8)
    return torch.cat([codes, scale.float().view(torch.int8).reshape(*x.shape[:-1], 4)], dim=-1)


def dequantize_rows(pool: torch.Tensor) -> torch.Tensor:
    """Float values of a pool: the pool itself, or an int8 pool's codes times their row scales."""
    if pool.dtype != torch.int8:
        return pool.float()
    d = pool.shape[-1] - 4
    return pool[..., :d].float() * pool[..., d:].contiguous().view(torch.float32)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_rope_store_rotates_and_stores(cache_dtype):
    torch.manual_seed(1)
    tokens, hq, hkv, d = 6, 4, 2, 32
    rotary = RotaryEmbedding(d, max_position=64, base=10000.0)
    positions = torch.tensor([0, 5, 9, 33, 2, 63])
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d)  # q, k, v as views of one product, as in the model
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    ref_q, ref_k = apply_rotary_native(q.clone(), k.clone(), RotaryEmbedding.cos_sin(rotary, positions))
    row = d + 4 if cache_dtype == torch.int8 else d
    k_cache = torch.zeros(20, hkv, row, dtype=cache_dtype)
    v_cache = torch.zeros(20, hkv, row, dtype=cache_dtype)
    loc = torch.tensor([3, 1, 19, 4, 7, 10])
    kernels.rope_store(q, k, v, positions, rotary._table(torch.device("cpu")), k_cache, v_cache, loc)
    assert rel_err(q, ref_q) < 1e-6 and rel_err(k, ref_k) < 1e-6
    # the pool holds the rotated k (rounded to its dtype as PyTorch rounds) and v
    if cache_dtype == torch.int8:
        assert torch.equal(k_cache[loc], int8_rows(k)) and torch.equal(v_cache[loc], int8_rows(v))
    else:
        assert torch.equal(k_cache[loc], k.to(cache_dtype)) and torch.equal(v_cache[loc], v.to(cache_dtype))
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[loc] = False
    assert not k_cache[untouched].any()


def reference_attention(q, k_cache, v_cache, slots, causal, scale):
    """q [n, Hq, D] over keys k_cache[slots]: output [n, Hq, D] and lse [n, Hq], in float64."""
    hq, hkv = q.shape[1], k_cache.shape[1]
    k = dequantize_rows(k_cache[slots]).double().transpose(0, 1).repeat_interleave(hq // hkv, 0)  # [Hq, L, D]
    v = dequantize_rows(v_cache[slots]).double().transpose(0, 1).repeat_interleave(hq // hkv, 0)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale  # [Hq, n, L]
    n, length = q.shape[0], len(slots)
    if causal:
        hidden = torch.arange(length)[None, :] > (length - n + torch.arange(n))[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(0, 1), torch.logsumexp(scores, -1).transpose(0, 1)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("causal", [True, False])
# 3, 1 and 2 query heads per KV head; a head size that is not a multiple of 64
@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 64), (4, 4, 64), (8, 4, 64), (4, 2, 80)])
@pytest.mark.parametrize("amx", [None, "exact", "bf16"])
def test_attention_over_slot_lists(cache_dtype, causal, hq, hkv, d, amx, isa):
    """Every task shape against float64; with `amx`, the tasks of 16 or more query rows run on AMX
    tiles (three bfloat16 passes: an error below 5e-5 here, against 2e-6 for the float32 tasks; one
    pass, bfloat16 products: below 2e-2)."""
    if amx and (not kernels.amx_available() or d != 64):
        pytest.skip("no AMX-BF16 here" if d == 64 else "the AMX tasks take head size 64")
    if amx and isa == "avx512":
        pytest.skip("AVX-512 runs where AMX does not")
    torch.manual_seed(2)
    pool = 3000
    if cache_dtype == torch.int8:
        k_cache, v_cache = int8_rows(torch.randn(pool, hkv, d)), int8_rows(torch.randn(pool, hkv, d))
    else:
        k_cache = torch.randn(pool, hkv, d).to(cache_dtype)
        v_cache = torch.randn(pool, hkv, d).to(cache_dtype)
    # (query rows, keys): decode-like (one or two queries; long ones are split along the keys; decode reads
    # the pool's rows in place, more rows go through a float32 block copy), extend-like
    # (many queries over a prefix and themselves, more rows than one task holds), ragged tails.
    shapes = [(1, 1), (1, 37), (1, 2500), (2, 50), (5, 5), (40, 300), (200, 230)] if causal else [(3, 100), (1, 2000), (50, 70)]
    total = sum(n for n, _ in shapes)
    q = torch.randn(total, hq, d)
    q_rows = torch.randperm(total)  # a sequence's queries need not be adjacent rows
    slot_lists = [torch.randperm(pool - 1)[:length] + 1 for _, length in shapes]
    q_off = torch.tensor([0] + [n for n, _ in shapes[:-1]]).cumsum(0)
    slot_off = torch.tensor([0] + [length for _, length in shapes[:-1]]).cumsum(0)
    lse = torch.empty(total, hq)
    out = kernels.attention(q, k_cache, v_cache, q_rows=q_rows, q_off=q_off,
                            q_len=torch.tensor([n for n, _ in shapes]), slots=torch.cat(slot_lists),
                            slot_off=slot_off, kv_len=torch.tensor([length for _, length in shapes]),
                            causal=causal, scale=d**-0.5, lse=lse, amx=amx)
    float_tasks = kernels.attention(q, k_cache, v_cache, q_rows=q_rows, q_off=q_off,
                                    q_len=torch.tensor([n for n, _ in shapes]), slots=torch.cat(slot_lists),
                                    slot_off=slot_off, kv_len=torch.tensor([length for _, length in shapes]),
                                    causal=causal, scale=d**-0.5) if amx else out
    tol = {None: 2e-6, "exact": 5e-5, "bf16": 2e-2}[amx]
    for i, (n, _) in enumerate(shapes):
        rows = q_rows[q_off[i] : q_off[i] + n]
        ref_out, ref_lse = reference_attention(q[rows], k_cache, v_cache, slot_lists[i], causal, d**-0.5)
        assert (out[rows].double() - ref_out).abs().max() < tol, shapes[i]
        assert (lse[rows].double() - ref_lse).abs().max() < tol, shapes[i]
        # tasks of 16 or more query rows took the AMX path (other bits than the float32 tasks'), the rest not
        assert torch.equal(out[rows], float_tasks[rows]) == (not amx or n * hq // hkv < 16), shapes[i]


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("hq,hkv,n", [(9, 3, 1), (6, 3, 1), (3, 3, 1), (2, 2, 3)])
def test_attention_in_place_segments(cache_dtype, hq, hkv, n, isa):
    """The path that reads the pool in place (at most 3 query rows per KV head) scores a segment of
    keys, takes one softmax step over it, then adds its values: lengths around the block (32) and
    segment (256) boundaries, long ones split along the keys, contiguous and scattered slots, several
    sequences in one call; with 3 query tokens of one head (n = 3) causal masks end inside segments."""
    torch.manual_seed(3)
    d, pool = 64, 6000
    if cache_dtype == torch.int8:
        k_cache, v_cache = int8_rows(torch.randn(pool, hkv, d)), int8_rows(torch.randn(pool, hkv, d))
    else:
        # scores spread wide enough that the running maximum moves between segments
        k_cache = (3 * torch.randn(pool, hkv, d)).to(cache_dtype)
        v_cache = torch.randn(pool, hkv, d).to(cache_dtype)
    lengths = [n, 31, 32, 33, 255, 256, 257, 513, 700, 2049]
    slot_lists = [torch.arange(1, 1 + length) if i % 2 else torch.randperm(pool - 1)[:length] + 1
                  for i, length in enumerate(lengths)]
    total = n * len(lengths)
    q = torch.randn(total, hq, d)
    q_rows = torch.arange(total)
    q_off = torch.arange(len(lengths)) * n
    slot_off = torch.tensor([0] + lengths[:-1]).cumsum(0)
    lse = torch.empty(total, hq)
    for split in (False, True):  # one sequence alone is split along the keys for the two threads
        seqs = range(len(lengths)) if not split else [len(lengths) - 1]
        for i in seqs:
            rows = q_rows[q_off[i] : q_off[i] + n]
            if split:
                out = kernels.attention(q, k_cache, v_cache, q_rows=rows, q_off=torch.tensor([0]),
                                        q_len=torch.tensor([n]), slots=slot_lists[i], slot_off=torch.tensor([0]),
                                        kv_len=torch.tensor([lengths[i]]), causal=True, scale=d**-0.5, lse=lse)
            elif i == 0:
                out = kernels.attention(q, k_cache, v_cache, q_rows=q_rows, q_off=q_off,
                                        q_len=torch.full((len(lengths),), n), slots=torch.cat(slot_lists),
                                        slot_off=slot_off, kv_len=torch.tensor(lengths), causal=True,
                                        scale=d**-0.5, lse=lse)
            ref_out, ref_lse = reference_attention(q[rows], k_cache, v_cache, slot_lists[i], True, d**-0.5)
            # (scores 3 times as wide as above: float32 rounding of the scores alone gives ~2e-6)
            assert (out[rows].double() - ref_out).abs().max() < 5e-6, (split, lengths[i])
            assert (lse[rows].double() - ref_lse).abs().max() < 5e-6, (split, lengths[i])


def test_the_kernels_are_built_wherever_they_can_run():
    """An install on x86-64 Linux builds the extension; on a CPU with AVX2, FMA and F16C it runs.
    (If this fails, `pip install` could not compile plait/runtime/cpu/csrc: see its build log.)"""
    import platform
    import sys

    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("the kernels are built for x86-64 Linux only")
    flags = open("/proc/cpuinfo").read().split()
    if not {"avx2", "fma", "f16c"} <= set(flags):
        pytest.skip("this CPU lacks AVX2/FMA/F16C")
    assert kernels.isa() == "avx2"
