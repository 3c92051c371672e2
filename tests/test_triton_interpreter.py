"""The Triton kernels (attention and fused layer ops) on the CPU, through Triton's interpreter.

The same kernels the GPU runs, on tiny sizes, against the torch-native reference; the GPU tests
(tests/gpu/) repeat this at real sizes and in bf16. The interpreter is chosen when Triton is first
imported, so this module sets TRITON_INTERPRET=1 before importing it, and skips when Triton is
missing, was already imported by something else, or a GPU is present (tests/gpu/ covers that).
The interpreter's bf16 matrix product is broken, so half precision is tested here in float16.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

from tests.attention_cases import make_case, reference, rel_error, run

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/gpu/ runs these kernels compiled", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before this module could select its interpreter", allow_module_level=True)

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    _ops = importlib.import_module("plait.runtime.attention.triton_ops")
    _backend_mod = importlib.import_module("plait.runtime.attention.triton_backend")
    _layer_ops = importlib.import_module("plait.runtime.layers.triton_ops")
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # also read while kernels run


def _backend():
    return _backend_mod.TritonBackend(device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    for prefix_lens, extend_lens, heads, kv_heads, head_dim in [
        ([0, 5, 70], [33, 1, 20], 4, 2, 16),  # prefix 0 and >0, single-token extend, GQA 2
        ([0], [130], 2, 2, 32),  # several query blocks and a ragged last block, MHA
        ([40, 0], [3, 7], 6, 2, 16),  # GQA 3 (not a power of two)
    ]:
        case = make_case(prefix_lens=prefix_lens, extend_lens=extend_lens, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, dtype=dtype, device="cpu", backend=_backend(), generator=g)
        err = rel_error(run(case), reference(case))
        assert err < TOL[dtype], (prefix_lens, extend_lens, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    for seq_lens, heads, kv_heads, head_dim in [
        ([18, 1, 300], 8, 2, 16),  # a one-token request, several splits for the long one
        ([200, 65, 64], 4, 1, 32),  # MQA; lengths at and around the block size
    ]:
        case = make_case(prefix_lens=[s - 1 for s in seq_lens], extend_lens=None, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, device="cpu", backend=_backend(),
                         generator=g)
        err = rel_error(run(case), reference(case))
        assert err < TOL[dtype], (seq_lens, err)


def test_kernels_write_every_output_element():
    g = torch.Generator().manual_seed(3)
    backend = _backend()
    case = make_case(prefix_lens=[9, 0], extend_lens=[20, 5], num_heads=4, num_kv_heads=2, head_dim=16,
                     dtype=torch.float32, device="cpu", backend=backend, generator=g)
    b = case.batch
    backend.init_forward_metadata(b)
    b.kv_pool.set_kv(0, b.out_cache_loc, case.k, case.v)
    meta = b.attn_metadata
    out = torch.full_like(case.q, float("nan"))
    _ops.extend_attention(case.q, case.k, case.v, b.kv_pool.k_buffers[0], b.kv_pool.v_buffers[0],
                          b.req_to_token_pool.req_to_token, b.req_pool_indices, meta.prefix_lens, meta.qo_indptr,
                          max_extend_len=meta.max_extend_len, sm_scale=case.layer.scaling, out=out)
    assert rel_error(out, reference(case)) < 1e-5

    case = make_case(prefix_lens=[130, 3], extend_lens=None, num_heads=4, num_kv_heads=2, head_dim=16,
                     dtype=torch.float32, device="cpu", backend=backend, generator=g)
    b = case.batch
    b.kv_pool.set_kv(0, b.out_cache_loc, case.k, case.v)
    out = torch.full_like(case.q, float("nan"))
    _ops.decode_attention(case.q, b.kv_pool.k_buffers[0], b.kv_pool.v_buffers[0], b.req_to_token_pool.req_to_token,
                          b.req_pool_indices, b.seq_lens, sm_scale=case.layer.scaling, max_splits=4, out=out,
                          block_n=32)  # 130 tokens: three splits of 64 used, the fourth empty
    assert rel_error(out, reference(case)) < 1e-5
    # One split: stage 1 writes the output itself (no merge stage).
    out = torch.full_like(case.q, float("nan"))
    _ops.decode_attention(case.q, b.kv_pool.k_buffers[0], b.kv_pool.v_buffers[0], b.req_to_token_pool.req_to_token,
                          b.req_pool_indices, b.seq_lens, sm_scale=case.layer.scaling, max_splits=1, out=out,
                          block_n=32)
    assert rel_error(out, reference(case)) < 1e-5


def test_graph_hooks_refill_static_metadata():
    """Capture-time metadata points at static buffers; a replay refill for a smaller batch gives
    the eager result for the real rows (the CUDA graph itself is tested on the GPU)."""
    g = torch.Generator().manual_seed(4)
    backend = _backend()
    backend.init_cuda_graph_state(max_bs=6, max_context_len=512)
    case = make_case(prefix_lens=[70, 0, 190], extend_lens=None, num_heads=4, num_kv_heads=2, head_dim=16,
                     dtype=torch.float32, device="cpu", backend=backend, generator=g)
    eager = run(case)

    real = case.batch
    bs = 4
    static = type(real)(**{**real.__dict__, "seq_lens_cpu": [1] * bs, "prefix_lens_cpu": [0] * bs,
                           "extend_lens_cpu": [1] * bs, "attn_metadata": None})
    backend.init_forward_metadata_capture_cuda_graph(static)
    # Poison the static rows, as a previous replay with other requests would leave them.
    backend._graph_req_pool_indices.fill_(2)
    backend._graph_seq_lens.fill_(300)
    backend.init_forward_metadata_replay_cuda_graph(real, bs)
    assert backend._graph_req_pool_indices[:bs].tolist() == [*real.req_pool_indices.tolist(), 0]
    assert backend._graph_seq_lens[:bs].tolist() == [*real.seq_lens.tolist(), 1]
    q = torch.cat([case.q, torch.randn(1, 4, 16, generator=g)])  # the padding row's query
    out = backend.forward_decode(q, case.layer, static)
    assert torch.isfinite(out).all()
    assert rel_error(out[:3], eager.double()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_fused_layer_ops_match_torch(dtype):
    from plait.runtime.layers.activation import SiluAndMul
    from plait.runtime.layers.norm import RMSNorm
    from plait.runtime.layers.rotary import RotaryEmbedding, apply_rotary_native

    g = torch.Generator().manual_seed(5)
    tol = 1e-6 if dtype == torch.float32 else 2e-3

    norm = RMSNorm(48, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(5, 2, 48, generator=g).to(dtype)[:, 0]  # rows strided, as in a split product
    residual = torch.randn(5, 48, generator=g).to(dtype)
    out, res = _layer_ops.rmsnorm(x, norm.weight, norm.eps, residual)
    ref_out, ref_res = norm.forward_native(x, residual)
    assert rel_error(out, ref_out.double()) < tol and torch.equal(res, ref_res)
    assert rel_error(_layer_ops.rmsnorm(x, norm.weight, norm.eps), norm.forward_native(x).double()) < tol

    h = torch.randn(6, 2 * 40, generator=g).to(dtype)
    assert rel_error(_layer_ops.silu_and_mul(h), SiluAndMul().forward_native(h).double()) < tol

    rotary = RotaryEmbedding(32, max_position=64, base=10000.0)
    positions = torch.randint(0, 64, (7,), generator=g)
    qkv = torch.randn(7, (4 + 2 + 2) * 32, generator=g).to(dtype)
    q, k = qkv[:, : 4 * 32].view(7, 4, 32), qkv[:, 4 * 32 : 6 * 32].view(7, 2, 32)
    inputs = rotary.cos_sin(positions)
    ref_q, ref_k = apply_rotary_native(q, k, inputs)
    v = qkv[:, 6 * 32 :].view(7, 2, 32)
    k_cache, v_cache = torch.zeros(10, 2, 32, dtype=dtype), torch.zeros(10, 2, 32, dtype=dtype)
    loc = torch.tensor([9, 2, 5, 1, 7, 3, 8])
    _layer_ops.rotary_inplace(q, k, positions, inputs.table, v=v, k_cache=k_cache, v_cache=v_cache, cache_loc=loc)
    assert rel_error(q, ref_q.double()) < tol and rel_error(k, ref_k.double()) < tol
    # The fused KV store: the rotated k and the v at their slots, nothing anywhere else.
    assert torch.equal(k_cache[loc], k) and torch.equal(v_cache[loc], v)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[loc] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_prefix_decode_matches_reference(dtype):
    """Groups sharing a prefix read it through the prefix kernel (one chunk, several chunks of one
    group, prefixes shorter and longer than the splits) and merge with their own part; ungrouped
    requests in the same batch take the plain path."""
    from tests.attention_cases import make_shared_prefix_case

    g = torch.Generator().manual_seed(5)
    for plan, heads, kv_heads, head_dim in [
        ([(70, [1, 5, 30]), (0, [40]), (130, [2, 2]), (0, [1])], 4, 2, 16),  # GQA 2: 32 members a chunk
        ([(65, [3] * 9 + [1]), (200, [17, 64])], 8, 1, 16),  # MQA at GQA 8: 8 members a chunk, two chunks
        ([(96, [1, 9, 4])], 6, 2, 16),  # GQA 3: padded tile rows
    ]:
        case = make_shared_prefix_case(plan=plan, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                       dtype=dtype, device="cpu", backend=_backend(), generator=g)
        backend = case.batch.attn_backend
        backend.init_forward_metadata(case.batch)
        out = backend.forward(case.q, case.k, case.v, case.layer, case.batch)
        assert case.batch.attn_metadata.shared is not None  # the prefix kernel ran
        err = rel_error(out, reference(case))
        assert err < TOL[dtype], (plan, err)


def test_shared_prefix_decode_never_reads_uninitialised_scratch(monkeypatch):
    """Scratch made with torch.empty may hold NaN (it did in a CI run): every float buffer the backend
    allocates is NaN-filled here, and the result must still be right (rows outside any group are never
    written by the prefix kernel, and 0 * NaN would survive the merge)."""
    from tests.attention_cases import make_shared_prefix_case

    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    g = torch.Generator().manual_seed(5)
    case = make_shared_prefix_case(plan=[(70, [1, 5, 30]), (0, [40]), (130, [2, 2]), (0, [1])], num_heads=4,
                                   num_kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu",
                                   backend=_backend(), generator=g)
    backend = case.batch.attn_backend
    monkeypatch.setattr(torch, "empty", nan_empty)
    backend.init_forward_metadata(case.batch)
    out = backend.forward(case.q, case.k, case.v, case.layer, case.batch)
    monkeypatch.setattr(torch, "empty", empty)
    err = rel_error(out, reference(case))
    assert err < TOL[torch.float32], err
