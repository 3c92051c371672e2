"""The fused Triton layer ops against the layers' PyTorch paths, and a whole model on the GPU
(fused ops + Triton attention) against Hugging Face `transformers` on the CPU."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.layers.activation import SiluAndMul
from plait.runtime.layers.norm import RMSNorm
from plait.runtime.layers.rotary import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_and_store,
    apply_rotary_native,
)
from tests.attention_cases import rel_error
from tests.tiny_models import FAMILIES, InMemorySource, tiny_hf_model

pytestmark = pytest.mark.gpu

# Both paths round at the same points, so they differ by rounding of the reductions alone.
TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape, dtype, g):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [4096, 960, 64])
def test_rmsnorm(dtype, hidden):
    g = torch.Generator(device="cuda").manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-5).to("cuda", dtype)
    norm.weight.copy_(1 + 0.3 * _randn(hidden, dtype=dtype, g=g))
    for rows in (1, 37, 4096):
        x = _randn(rows, 3 * hidden, dtype=dtype, g=g)[:, hidden : 2 * hidden]  # strided rows
        residual = _randn(rows, hidden, dtype=dtype, g=g)
        out, res = norm(x, residual)
        ref_out, ref_res = norm.forward_native(x, residual)
        assert torch.equal(res, ref_res)
        assert rel_error(out, ref_out.double()) < TOL[dtype]
        assert rel_error(norm(x), norm.forward_native(x).double()) < TOL[dtype]


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    act = SiluAndMul()
    for rows, inter in ((1, 14336), (33, 2560), (512, 100)):
        x = 3 * _randn(rows, 2 * inter, dtype=dtype, g=g)
        out = act(x)
        assert rel_error(out, act.forward_native(x).double()) < TOL[dtype]


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (4, 4, 16)])
def test_rotary_in_place(dtype, heads):
    num_heads, num_kv_heads, head_dim = heads
    g = torch.Generator(device="cuda").manual_seed(2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    rotary = RotaryEmbedding(head_dim, max_position=131072, base=500000.0, scaling=scaling)
    for num_tokens in (1, 300):
        positions = torch.randint(0, 131072, (num_tokens,), generator=g, device="cuda")
        qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, g=g)
        q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
        v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
        inputs = rotary.cos_sin(positions)
        assert inputs.cos is None  # the fused path is taken on CUDA
        ref_q, ref_k = apply_rotary_native(q.clone(), k.clone(), inputs)
        out_q, out_k = apply_rotary(q, k, inputs)
        assert out_q.data_ptr() == q.data_ptr()  # in place
        assert rel_error(out_q, ref_q.double()) < TOL[dtype] and rel_error(out_k, ref_k.double()) < TOL[dtype]
        assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)  # v untouched


@torch.no_grad()
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_rotary_stores_kv(cache_dtype):
    """The fused rotary + KV store equals rotating, then `KVPool.set_kv`; other slots stay as they were."""
    from plait.runtime.memory.kv_pool import KVPool

    num_heads, num_kv_heads, head_dim, num_tokens = 32, 8, 128, 37
    g = torch.Generator(device="cuda").manual_seed(3)
    rotary = RotaryEmbedding(head_dim, max_position=8192, base=500000.0)
    positions = torch.randint(0, 8192, (num_tokens,), generator=g, device="cuda")
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=torch.bfloat16, g=g)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
    loc = torch.randperm(200, generator=g, device="cuda")[:num_tokens] + 1
    fused, ref = (KVPool(num_slots=200, num_layers=2, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         dtype=cache_dtype, device="cuda") for _ in range(2))
    for pool in (fused, ref):
        for buf in pool.k_buffers + pool.v_buffers:
            buf.copy_(torch.randn(buf.shape, generator=g, device="cuda"))
    ref.k_buffers[1].copy_(fused.k_buffers[1])
    ref.v_buffers[1].copy_(fused.v_buffers[1])
    inputs = rotary.cos_sin(positions)
    ref_q, ref_k = apply_rotary_native(q.clone(), k.clone(), inputs)
    ref.set_kv(1, loc, ref_k, v)
    assert apply_rotary_and_store(q, k, v, inputs, *fused.layer_buffers(1), loc)
    assert rel_error(q, ref_q.double()) < TOL[torch.bfloat16] and rel_error(k, ref_k.double()) < TOL[torch.bfloat16]
    # Same rounding as the unfused path: the stored rotated k is the in-place k cast to the pool dtype.
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # bitwise (8-bit floats have no equality kernels)
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    assert same(fused.k_buffers[1][loc], k.to(cache_dtype))
    assert same(fused.v_buffers[1], ref.v_buffers[1])
    others = torch.ones(201, dtype=torch.bool, device="cuda")
    others[loc] = False
    assert same(fused.k_buffers[1][others], ref.k_buffers[1][others])


def _runner(hf_model, backend: str) -> ModelRunner:
    # CUDA graphs have their own tests (test_cuda_graph.py); this one checks the eager kernels.
    no_graphs = {"disable_cuda_graph": True} if "disable_cuda_graph" in {f.name for f in fields(ModelConfig)} else {}
    return ModelRunner(
        ModelConfig(dtype="float32", device="cuda", attention_backend=backend, **no_graphs),
        MemoryConfig(max_total_tokens=4096, max_running_requests=8),
        source=InMemorySource(hf_model),
    )


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_model_on_gpu_matches_transformers(family):
    """Prefill, an extend over the cached prefix and decodes, through the GPU default path
    (Triton attention, fused ops), equal the Hugging Face model's logits on the same ids."""
    hf = tiny_hf_model(family)
    runner = _runner(hf, "triton")
    ids = torch.randint(0, 320, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = hf(torch.tensor([ids])).logits[0].float()
    scale = ref.abs().max().item()
    row = runner.req_to_token_pool.alloc()
    common = {"req_to_token_pool": runner.req_to_token_pool, "kv_pool": runner.kv_pool, "attn_backend": runner.attn_backend}
    runner.forward(make_extend_batch(req_pool_indices=[row], prefix_lens=[0], new_token_ids=[ids[:40]],
                                     out_cache_loc=runner.allocator.alloc(40), **common))
    out = runner.forward(make_extend_batch(req_pool_indices=[row], prefix_lens=[40], new_token_ids=[ids[40:85]],
                                           out_cache_loc=runner.allocator.alloc(45), logits_start_lens=[0], **common))
    assert (out.input_token_logits[0].cpu() - ref[40:85]).abs().max().item() <= 1e-4 * scale
    for pos in range(85, 90):
        batch = make_decode_batch(req_pool_indices=[row], seq_lens=[pos + 1], last_token_ids=[ids[pos]],
                                  out_cache_loc=runner.allocator.alloc(1), **common)
        logits = runner.forward(batch).next_token_logits[0].cpu()
        assert (logits - ref[pos]).abs().max().item() <= 1e-4 * scale, pos


@torch.no_grad()
def test_fp8_kv_cache_model_stays_close():
    """A tiny bf16 model with `kv_cache_dtype=fp8_e4m3`: the pool is 8-bit (half the bytes per token)
    and prefill + CUDA-graph decode logits stay close to those with a bf16 pool."""
    hf = tiny_hf_model("llama", seed=11)
    runners = [ModelRunner(ModelConfig(dtype="bfloat16", device="cuda", kv_cache_dtype=kv),
                           MemoryConfig(max_total_tokens=4096, max_running_requests=8), source=InMemorySource(hf))
               for kv in ("auto", "fp8_e4m3")]
    assert runners[1].kv_pool.k_buffers[0].dtype == torch.float8_e4m3fn
    assert runners[1].kv_bytes_per_token * 2 == runners[0].kv_bytes_per_token
    assert runners[1].graph_runner is not None
    rng = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=rng).tolist() for n in (7, 60, 33)]
    logits = []
    for runner in runners:
        common = {"req_to_token_pool": runner.req_to_token_pool, "kv_pool": runner.kv_pool,
                  "attn_backend": runner.attn_backend}
        rows = [runner.req_to_token_pool.alloc() for _ in prompts]
        batch = make_extend_batch(req_pool_indices=rows, prefix_lens=[0] * 3, new_token_ids=prompts,
                                  out_cache_loc=runner.allocator.alloc(sum(map(len, prompts))), **common)
        first = runner.forward(batch).next_token_logits
        seq_lens = [len(p) + 1 for p in prompts]
        batch = make_decode_batch(req_pool_indices=rows, seq_lens=seq_lens, last_token_ids=[5, 6, 7],
                                  out_cache_loc=runner.allocator.alloc(3), **common)
        logits.append((first, runner.forward(batch).next_token_logits))
    for ours, ref in zip(logits[1], logits[0]):
        assert rel_error(ours, ref.double()) < 0.05
