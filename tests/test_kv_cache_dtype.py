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
    with pytest.raises(ValueError, match="kv_cache_dtype fp8_e5m2 needs the triton attention backend"):
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
