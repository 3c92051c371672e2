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
@pytest.mark.parametrize("arith", ["float", "amx", "amx-bf16", "int16"])
def test_attention_over_slot_lists(cache_dtype, causal, hq, hkv, d, arith, isa):
    """Every task shape against float64; with `arith` amx, the tasks of 16 or more query rows run on
    AMX tiles (three bfloat16 passes: an error below 5e-5 here, against 2e-6 for the float32 tasks;
    one pass, amx-bf16, bfloat16 products: below 2e-2); with int16 the tasks of more than 3 rows of
    a KV head on integer codes (13- and 14-bit rounding: below 3e-3)."""
    amx = arith.startswith("amx")
    if amx and (not kernels.amx_available() or d != 64):
        pytest.skip("no AMX-BF16 here" if d == 64 else "the AMX tasks take head size 64")
    if amx and isa == "avx512":
        pytest.skip("AVX-512 runs where AMX does not")
    if arith == "int16" and not kernels.int16_attention_available(d):
        pytest.skip("no AVX-512 VNNI here" if d % 32 == 0 else "integer attention takes head sizes 32 .. 128")
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
                            causal=causal, scale=d**-0.5, lse=lse, arith=arith)
    float_tasks = kernels.attention(q, k_cache, v_cache, q_rows=q_rows, q_off=q_off,
                                    q_len=torch.tensor([n for n, _ in shapes]), slots=torch.cat(slot_lists),
                                    slot_off=slot_off, kv_len=torch.tensor([length for _, length in shapes]),
                                    causal=causal, scale=d**-0.5) if arith != "float" else out
    tol = {"float": 2e-6, "amx": 5e-5, "amx-bf16": 2e-2, "int16": 3e-3}[arith]
    other_rows = {"float": 10**9, "amx": 16, "amx-bf16": 16, "int16": 4}[arith]  # tasks this many rows or more
    for i, (n, _) in enumerate(shapes):
        rows = q_rows[q_off[i] : q_off[i] + n]
        ref_out, ref_lse = reference_attention(q[rows], k_cache, v_cache, slot_lists[i], causal, d**-0.5)
        assert (out[rows].double() - ref_out).abs().max() < tol, shapes[i]
        assert (lse[rows].double() - ref_lse).abs().max() < tol, shapes[i]
        # tasks of 16 (AMX) or 4 (integers) or more query rows of a KV head took that path (other bits
        # than the float32 tasks'), the rest not
        assert torch.equal(out[rows], float_tasks[rows]) == (n * hq // hkv < other_rows), shapes[i]


def _codes(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows (last dimension) as integer codes at `levels` with one scale a row, rounded as the
    kernels round (float32 x times levels / max|x|, to nearest even)."""
    top = x.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, torch.tensor(float(levels)) / top, torch.zeros_like(top))
    return torch.round(x * inv), top / levels


def reference_int16_attention(q, k_cache, v_cache, slots, causal, scale):
    """The integer attention's rounding in float64 arithmetic: q (scaled) and k at 13 bits per row,
    scores from the exact code products; the softmax weights times the values' row scales at 14 bits
    per 32 keys, the values at 14 bits per row."""
    hq, hkv = q.shape[1], k_cache.shape[1]
    k = dequantize_rows(k_cache[slots]).float().transpose(0, 1).repeat_interleave(hq // hkv, 0)  # [Hq, L, D]
    v = dequantize_rows(v_cache[slots]).float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
    (qc, qs), (kc, ks) = _codes((q * scale).transpose(0, 1), 4095), _codes(k, 4095)
    scores = (qc.double() @ kc.double().transpose(1, 2)) * (qs.double() * ks.double().transpose(1, 2))
    n, length = q.shape[0], len(slots)
    if causal:
        hidden = torch.arange(length)[None, :] > (length - n + torch.arange(n))[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    vc, vs = _codes(v, 8191)
    weighted = torch.nn.functional.pad(torch.softmax(scores, -1) * vs.double().transpose(1, 2), (0, (-length) % 32))
    pc, ps = _codes(weighted.reshape(*weighted.shape[:-1], -1, 32), 8191)
    return ((pc * ps).reshape(weighted.shape)[..., :length] @ vc.double()).transpose(0, 1)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 2, 128), (8, 4, 32)])
def test_int16_attention_computes_the_rounding_it_was_chosen_for(cache_dtype, hq, hkv, d):
    """The integer attention against a float64 model of its rounding (the rounding `python -m
    plait.bench.rounding --attention` measures the default model's greedy outputs under): on
    average a tenth as far from the model as the model is from exact attention. What differences
    remain are codes one step apart where float32 rounding (the kernel's exponential, its running
    maximum) falls on the other side of a half: one weight's step moves an output by up to ~4e-4."""
    if not kernels.int16_attention_available(d):
        pytest.skip("no AVX-512 VNNI here")
    torch.manual_seed(4)
    pool = 3000
    if cache_dtype == torch.int8:
        k_cache, v_cache = int8_rows(torch.randn(pool, hkv, d)), int8_rows(torch.randn(pool, hkv, d))
    else:
        k_cache, v_cache = torch.randn(pool, hkv, d).to(cache_dtype), torch.randn(pool, hkv, d).to(cache_dtype)
    shapes = [(5, 5), (40, 300), (200, 230), (3, 100), (64, 700)]
    for causal in (True, False):
        total = sum(n for n, _ in shapes)
        q = torch.randn(total, hq, d)
        q_rows = torch.randperm(total)
        slot_lists = [torch.randperm(pool - 1)[:length] + 1 for _, length in shapes]
        q_off = torch.tensor([0] + [n for n, _ in shapes[:-1]]).cumsum(0)
        slot_off = torch.tensor([0] + [length for _, length in shapes[:-1]]).cumsum(0)
        out = kernels.attention(q, k_cache, v_cache, q_rows=q_rows, q_off=q_off,
                                q_len=torch.tensor([n for n, _ in shapes]), slots=torch.cat(slot_lists),
                                slot_off=slot_off, kv_len=torch.tensor([length for _, length in shapes]),
                                causal=causal, scale=d**-0.5, arith="int16")
        for i, (n, _) in enumerate(shapes):
            rows = q_rows[q_off[i] : q_off[i] + n]
            model = reference_int16_attention(q[rows], k_cache, v_cache, slot_lists[i], causal, d**-0.5)
            exact, _ = reference_attention(q[rows], k_cache, v_cache, slot_lists[i], causal, d**-0.5)
            off = (out[rows].double() - model).abs()
            assert off.max() < 5e-4, (causal, shapes[i])
            assert off.mean() < 0.1 * (model - exact).abs().mean(), (causal, shapes[i], off.mean())


@needs_kernels
def test_int16_attention_is_refused_where_it_cannot_run():
    q = torch.randn(4, 2, 80)
    cache = torch.zeros(8, 1, 80)
    meta = dict(q_rows=torch.arange(4), q_off=torch.tensor([0]), q_len=torch.tensor([4]), slots=torch.arange(4),
                slot_off=torch.tensor([0]), kv_len=torch.tensor([4]), causal=True, scale=1.0)
    with pytest.raises(ValueError, match="int16 attention"):
        kernels.attention(q, cache, cache, arith="int16", **meta)  # head size 80
    with pytest.raises(ValueError, match="unknown attention arithmetic"):
        kernels.attention(q, cache, cache, arith="tf32", **meta)


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
