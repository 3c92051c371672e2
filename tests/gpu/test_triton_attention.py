"""The Triton attention backend against the torch-native reference on the GPU, and its CUDA-graph hooks.

Every case draws fresh random KV, queries and slot/row layouts; errors are ‖out − ref‖ / ‖ref‖
against the reference run in float64 on the CPU. Tolerances: float32 (IEEE products) 2e-5, bf16 1e-2,
float16 2e-3.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from plait.runtime.attention.torch_native import TorchNativeBackend
from plait.runtime.attention.triton_backend import TritonBackend
from plait.runtime.attention.triton_ops import (
    decode_attention,
    decode_config,
    extend_attention,
)
from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode
from plait.runtime.layers.attention import RadixAttention
from plait.runtime.memory.kv_pool import KVPool, ReqToTokenPool
from tests.attention_cases import make_case, reference, rel_error, run

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (num_heads, num_kv_heads, head_dim): Llama-3.1-8B, MHA, GQA 7 (Qwen2-0.5B), MQA, SmolLM2's 64.
SHAPES = [(32, 8, 128), (8, 8, 128), (14, 2, 64), (16, 1, 64), (9, 3, 64)]


def _random_extend_lens(rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    prefix_lens = [rng.choice([0, 0, rng.randint(1, 40), rng.randint(100, 700)]) for _ in range(n)]
    extend_lens = [rng.choice([1, rng.randint(2, 70), rng.randint(100, 400)]) for _ in range(n)]
    return prefix_lens, extend_lens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_extend_matches_reference(dtype, shape):
    num_heads, num_kv_heads, head_dim = shape
    rng = random.Random(zlib.crc32(repr((dtype, shape)).encode()))
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    for trial in range(3):
        prefix_lens, extend_lens = _random_extend_lens(rng, rng.randint(1, 6))
        case = make_case(prefix_lens=prefix_lens, extend_lens=extend_lens, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device="cuda",
                         backend=TritonBackend(device="cuda"), generator=g)
        err = rel_error(run(case), reference(case))
        assert err < TOL[dtype], (prefix_lens, extend_lens, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_prompts_without_prefix(dtype):
    """The prefill case that must be fast is also the one with the most query blocks per request."""
    g = torch.Generator().manual_seed(11)
    case = make_case(prefix_lens=[0, 0, 0], extend_lens=[1500, 999, 2048], num_heads=32, num_kv_heads=8,
                     head_dim=128, dtype=dtype, device="cuda", backend=TritonBackend(device="cuda"), generator=g)
    err = rel_error(run(case), reference(case))
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_matches_reference(dtype, shape):
    num_heads, num_kv_heads, head_dim = shape
    rng = random.Random(zlib.crc32(repr(("decode", dtype, shape)).encode()))
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    for batch_size, max_len in ((1, 5000), (7, 3000), (40, 800)):  # the float64 reference pads to max_len
        seq_lens = [rng.choice([1, rng.randint(2, 64), rng.randint(65, max_len)]) for _ in range(batch_size)]
        case = make_case(prefix_lens=[s - 1 for s in seq_lens], extend_lens=None, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device="cuda",
                         backend=TritonBackend(device="cuda"), generator=g)
        err = rel_error(run(case), reference(case))
        assert err < TOL[dtype], (seq_lens, err)


def test_same_as_torch_native_on_the_gpu():
    """Both backends in bf16 on the GPU land equally close to the float64 reference."""
    g = torch.Generator().manual_seed(12)
    for extend_lens in ([37, 1, 250], None):
        case = make_case(prefix_lens=[0, 300, 17], extend_lens=extend_lens, num_heads=32, num_kv_heads=8,
                         head_dim=128, dtype=torch.bfloat16, device="cuda", backend=TritonBackend(device="cuda"),
                         generator=g)
        ref = reference(case)
        ours, theirs = rel_error(run(case), ref), rel_error(run(case, TorchNativeBackend()), ref)
        assert ours < 2 * theirs + 1e-3, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_write_every_output_element(dtype):
    g = torch.Generator().manual_seed(13)
    backend = TritonBackend(device="cuda")
    case = make_case(prefix_lens=[0, 129, 5], extend_lens=[200, 64, 1], num_heads=32, num_kv_heads=8,
                     head_dim=128, dtype=dtype, device="cuda", backend=backend, generator=g)
    b = case.batch
    backend.init_forward_metadata(b)
    b.kv_pool.set_kv(0, b.out_cache_loc, case.k, case.v)
    meta = b.attn_metadata
    out = torch.full_like(case.q, float("nan"))
    extend_attention(case.q, case.k, case.v, b.kv_pool.k_buffers[0], b.kv_pool.v_buffers[0],
                     b.req_to_token_pool.req_to_token, b.req_pool_indices, meta.prefix_lens, meta.qo_indptr,
                     max_extend_len=meta.max_extend_len, sm_scale=case.layer.scaling, out=out)
    assert rel_error(out, reference(case)) < TOL[dtype]

    for max_splits in (1, 4, 32):
        case = make_case(prefix_lens=[1000, 0, 63, 64], extend_lens=None, num_heads=32, num_kv_heads=8,
                         head_dim=128, dtype=dtype, device="cuda", backend=backend, generator=g)
        b = case.batch
        b.kv_pool.set_kv(0, b.out_cache_loc, case.k, case.v)
        out = torch.full_like(case.q, float("nan"))
        decode_attention(case.q, b.kv_pool.k_buffers[0], b.kv_pool.v_buffers[0], b.req_to_token_pool.req_to_token,
                         b.req_pool_indices, b.seq_lens, sm_scale=case.layer.scaling, max_splits=max_splits, out=out)
        assert rel_error(out, reference(case)) < TOL[dtype], max_splits


def test_decode_under_cuda_graph_replays_other_batches():
    """Capture decode at two batch sizes over static buffers; replay with fewer real rows and other
    lengths (longer than anything seen at capture) and compare with eager runs."""
    num_heads, num_kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16
    g = torch.Generator().manual_seed(14)
    rng = random.Random(14)
    backend = TritonBackend(device="cuda")
    kv_pool = KVPool(num_slots=40000, num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                     device="cuda")
    req_pool = ReqToTokenPool(20, 4200, "cuda")
    max_bs = 16
    backend.init_cuda_graph_state(max_bs, req_pool.max_context_len)
    static_q = torch.randn(max_bs, num_heads, head_dim, device="cuda", dtype=dtype)
    static_k = torch.randn(max_bs, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    static_v = torch.randn(max_bs, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    static_loc = torch.zeros(max_bs, dtype=torch.int64, device="cuda")
    static_rows = torch.zeros(max_bs, dtype=torch.int64, device="cuda")
    static_lens = torch.ones(max_bs, dtype=torch.int64, device="cuda")
    layer = RadixAttention(layer_id=0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           scaling=head_dim**-0.5)

    graphs, outputs, pool = {}, {}, None
    for bs in (16, 8):  # largest first, sharing one memory pool, as a graph runner does
        batch = ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=torch.zeros(bs, dtype=torch.int64, device="cuda"),
            positions=torch.zeros(bs, dtype=torch.int64, device="cuda"), out_cache_loc=static_loc[:bs],
            req_pool_indices=static_rows[:bs], seq_lens=static_lens[:bs], seq_lens_cpu=[1] * bs,
            prefix_lens_cpu=[0] * bs, extend_lens_cpu=[1] * bs, req_to_token_pool=req_pool, kv_pool=kv_pool,
            attn_backend=backend,
        )
        backend.init_forward_metadata_capture_cuda_graph(batch)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            backend.forward(static_q[:bs], static_k[:bs], static_v[:bs], layer, batch)  # warm-up: compiles
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[bs] = backend.forward(static_q[:bs], static_k[:bs], static_v[:bs], layer, batch)
        pool = graph.pool()
        graphs[bs] = graph

    for bs, raw_bs, max_len in ((16, 16, 300), (16, 5, 4000), (8, 1, 4000), (8, 8, 70), (16, 11, 2500)):
        seq_lens = [rng.randint(1, max_len) for _ in range(raw_bs)]
        case = make_case(prefix_lens=[s - 1 for s in seq_lens], extend_lens=None, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, device="cuda", backend=backend,
                         generator=g, kv_pool=kv_pool, req_pool=req_pool)
        real = case.batch
        static_q[:raw_bs].copy_(case.q)
        static_k[:raw_bs].copy_(case.k)
        static_v[:raw_bs].copy_(case.v)
        static_loc[:bs].zero_()
        static_loc[:raw_bs].copy_(real.out_cache_loc)
        backend.init_forward_metadata_replay_cuda_graph(real, bs)
        outputs[bs].fill_(float("nan"))
        graphs[bs].replay()
        torch.cuda.synchronize()
        replayed = outputs[bs][:raw_bs].clone()
        assert torch.isfinite(outputs[bs]).all(), "padded rows must stay finite"
        # Eager, with the split count of the captured size: the same arithmetic, so the same bits.
        eager = decode_attention(case.q, kv_pool.k_buffers[0], kv_pool.v_buffers[0], req_pool.req_to_token,
                                 real.req_pool_indices, real.seq_lens, sm_scale=layer.scaling,
                                 **decode_config(bs, num_kv_heads, head_dim, 2, backend.num_sms, backend.smem_bytes)._asdict())
        assert torch.equal(replayed, eager), (bs, raw_bs)
        assert rel_error(replayed, reference(case)) < TOL[dtype], (bs, raw_bs)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e5m2, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("mode", ["extend", "decode"])
def test_fp8_kv_pool(kv_dtype, mode):
    """With an 8-bit pool (`--kv-cache-dtype`) the kernels compute attention over the stored values:
    equal to the reference over the same (dequantized) values, to bf16 tolerance; new K/V land rounded."""
    rng = random.Random(zlib.crc32(repr((kv_dtype, mode)).encode()))
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    for _ in range(2):
        prefix_lens, extend_lens = _random_extend_lens(rng, rng.randint(1, 6))
        if mode == "decode":
            prefix_lens, extend_lens = [p + e - 1 for p, e in zip(prefix_lens, extend_lens)], None
        case = make_case(prefix_lens=prefix_lens, extend_lens=extend_lens, num_heads=32, num_kv_heads=8,
                         head_dim=128, dtype=torch.bfloat16, device="cuda", backend=TritonBackend(device="cuda"),
                         generator=g)
        b = case.batch
        pool = KVPool(num_slots=b.kv_pool.num_slots, num_layers=1, num_kv_heads=8, head_dim=128, dtype=kv_dtype,
                      device="cuda")
        pool.k_buffers[0].copy_(b.kv_pool.k_buffers[0])
        pool.v_buffers[0].copy_(b.kv_pool.v_buffers[0])
        b.kv_pool = pool
        for t in (case.k, case.v):  # values the pool can hold exactly, so the reference sees what is stored
            t.copy_(t.to(kv_dtype))
        out = run(case)
        assert rel_error(out, reference(case)) < TOL[torch.bfloat16], (prefix_lens, extend_lens)
        assert torch.equal(pool.k_buffers[0][b.out_cache_loc].float(), case.k.float())
        assert torch.equal(pool.v_buffers[0][b.out_cache_loc].float(), case.v.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shared_prefix_decode_matches_reference(dtype, shape):
    """Decode with `shared_prefixes` (the prefix kernel, a request's own part from its start, the
    merge) against the reference, on groups of 1 to 40 members, prefixes from 64 to 3000 tokens,
    beside ungrouped requests."""
    from tests.attention_cases import make_shared_prefix_case

    num_heads, num_kv_heads, head_dim = shape
    rng = random.Random(zlib.crc32(repr(("shared", dtype, shape)).encode()))
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    for trial in range(2):
        plan = [(rng.choice([64, rng.randint(65, 700), rng.randint(1000, 3000)]),
                 [rng.choice([1, rng.randint(2, 50), rng.randint(100, 300)]) for _ in range(rng.choice([2, 5, 17, 40]))])
                for _ in range(rng.randint(1, 4))]
        plan += [(0, [rng.randint(1, 900)]) for _ in range(rng.randint(0, 3))]
        case = make_shared_prefix_case(plan=plan, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       head_dim=head_dim, dtype=dtype, device="cuda",
                                       backend=TritonBackend(device="cuda"), generator=g)
        out = run(case)
        assert case.batch.attn_metadata.shared is not None
        err = rel_error(out, reference(case))
        assert err < TOL[dtype], ([(p, len(m)) for p, m in plan], err)
