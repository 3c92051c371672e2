"""`--kv-cache-dtype`: the 8-bit pool's storage and the clear refusals (the kernels are tested on the GPU,
tests/gpu/test_triton_attention.py and test_fused_ops.py)."""

from __future__ import annotations

import argparse

import pytest
import torch

from plait.runtime.cli_args import add_runtime_args, runtime_options
from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.memory.kv_pool import KVPool
from tests.tiny_models import InMemorySource, tiny_hf_model


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn], ids=str)
def test_fp8_pool_stores_rounded_values_at_their_slots(dtype):
    pool = KVPool(num_slots=12, num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype)
    assert KVPool.bytes_per_token(num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype) * 2 == (
        KVPool.bytes_per_token(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 8, generator=g, dtype=torch.bfloat16), torch.randn(3, 2, 8, generator=g)
    loc = torch.tensor([11, 2, 6])
    pool.set_kv(1, loc, k, v)
    assert torch.equal(pool.k_buffers[1][loc].float(), k.to(dtype).float())
    assert torch.equal(pool.v_buffers[1][loc].float(), v.to(dtype).float())
    others = torch.ones(13, dtype=torch.bool)
    others[loc] = False
    assert not pool.k_buffers[1][others].float().any() and not pool.k_buffers[0].float().any()


def test_fp8_kv_cache_needs_the_triton_backend():
    with pytest.raises(ValueError, match="kv_cache_dtype fp8_e5m2 is not supported by the .* backend.*it supports"):
        ModelRunner(ModelConfig(dtype="float32", device="cpu", kv_cache_dtype="fp8_e5m2"),
                    MemoryConfig(max_total_tokens=256), source=InMemorySource(tiny_hf_model("llama", seed=1)))
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int4'"):
        ModelRunner(ModelConfig(dtype="float32", device="cpu", kv_cache_dtype="int4"),
                    MemoryConfig(max_total_tokens=256), source=InMemorySource(tiny_hf_model("llama", seed=1)))


def test_kv_cache_dtype_flag():
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    assert runtime_options(parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"]))["kv_cache_dtype"] == "fp8_e4m3"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "fp16"])


def _runner(**model) -> ModelRunner:
    return ModelRunner(ModelConfig(device="cpu", **model), MemoryConfig(max_total_tokens=256),
                       source=InMemorySource(tiny_hf_model("llama", seed=1)))


def test_cpu_kv_cache_defaults_to_float16_only_when_the_dtype_is_automatic():
    from plait.runtime.cpu import kernels

    auto = _runner()
    assert auto.dtype == torch.float32
    assert auto.kv_dtype == (torch.float16 if kernels.available() else torch.float32)
    assert _runner(dtype="float32").kv_dtype == torch.float32  # asked for float32: exact KV too
    assert _runner(dtype="float32", kv_cache_dtype="bfloat16").kv_dtype == torch.bfloat16


@pytest.mark.parametrize("backend,kv", [("cpu", "float16"), ("cpu", "bfloat16"), ("cpu", "int8"),
                                        ("torch_native", "float16"), ("torch_native", "bfloat16")])
def test_smaller_kv_pools_give_the_float32_logits_to_rounding(backend, kv):
    """The same prompt and decode step with a float32 pool and a 16-bit or int8 one: logits agree to
    the rounding of K and V (and each backend reads its pool in place of a float32 one)."""
    from plait.runtime.cpu import kernels
    from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch

    if backend == "cpu" and not kernels.available():
        pytest.skip("CPU kernels not built here")
    opts = {"dtype": "float32", "attention_backend": backend}
    if backend == "torch_native":
        opts["disable_cpu_kernels"] = True
    logits = {}
    for pool_dtype in ("float32", kv):
        runner = _runner(kv_cache_dtype=pool_dtype, **opts)
        assert runner.kv_pool.dtype == getattr(torch, pool_dtype)
        row = runner.req_to_token_pool.alloc()
        ids = list(range(3, 40))
        runner.forward(make_extend_batch(
            req_pool_indices=[row], prefix_lens=[0], new_token_ids=[ids], out_cache_loc=runner.allocator.alloc(len(ids)),
            req_to_token_pool=runner.req_to_token_pool, kv_pool=runner.kv_pool, attn_backend=runner.attn_backend))
        out = runner.forward(make_decode_batch(
            req_pool_indices=[row], seq_lens=[len(ids) + 1], last_token_ids=[7], out_cache_loc=runner.allocator.alloc(1),
            req_to_token_pool=runner.req_to_token_pool, kv_pool=runner.kv_pool, attn_backend=runner.attn_backend))
        logits[pool_dtype] = out.next_token_logits
    ref, ours = logits["float32"], logits[kv]
    err = (ours - ref).abs().max() / ref.abs().max()
    assert 0 < err < {"bfloat16": 2e-2, "float16": 3e-3, "int8": 3e-2}[kv]  # rounded (not silently float32), only that


def test_int8_kv_pool_is_refused_where_nothing_reads_it():
    with pytest.raises(ValueError, match="kv_cache_dtype int8 is not supported by the TorchNativeBackend"):
        _runner(dtype="float32", kv_cache_dtype="int8", attention_backend="torch_native", disable_cpu_kernels=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_dtype_on_the_cpu_kernels_stores_weights_and_kv_in_it(dtype):
    """`--dtype bfloat16/float16` on the CPU kernels: weights and KV stored in that type, computed in
    float32 by the kernels (not the slow PyTorch path a half dtype used to fall back to)."""
    from plait.runtime.cpu import kernels
    from plait.runtime.cpu.linear import CpuLinear
    from plait.runtime.executor.forward_batch import make_extend_batch

    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    half = getattr(torch, dtype)
    runner, exact = _runner(dtype=dtype), _runner(dtype="float32")
    assert runner.use_cpu_kernels and runner.dtype == torch.float32 and runner.weight_dtype == half
    assert runner.kv_dtype == half and runner.execution_info()["weight_dtype"] == dtype
    assert _runner(dtype=dtype, kv_cache_dtype="int8").kv_dtype == torch.int8  # an explicit KV dtype wins
    linears = [m for m in runner.model.modules() if isinstance(m, CpuLinear)]
    assert linears and all(m.stored.data.dtype == half for m in linears)
    reference = {n: m for n, m in exact.model.named_modules() if isinstance(m, CpuLinear)}
    for name, module in runner.model.named_modules():
        if isinstance(module, CpuLinear) and name in reference:
            assert torch.equal(module.stored.dequantize(), reference[name].stored.dequantize().to(half).float())
    logits = []
    for r in (exact, runner):
        row, ids = r.req_to_token_pool.alloc(), list(range(3, 40))
        out = r.forward(make_extend_batch(
            req_pool_indices=[row], prefix_lens=[0], new_token_ids=[ids], out_cache_loc=r.allocator.alloc(len(ids)),
            req_to_token_pool=r.req_to_token_pool, kv_pool=r.kv_pool, attn_backend=r.attn_backend))
        logits.append(out.next_token_logits)
    err = (logits[1] - logits[0]).abs().max() / logits[0].abs().max()
    assert 0 < err < {"bfloat16": 5e-2, "float16": 1e-2}[dtype]
