"""The CUDA-graph runner's host-side parts, which need no GPU: the captured batch sizes, the padding
of the static inputs, the flags, and that the CPU path stays eager."""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import torch

from plait.runtime.cli_args import add_runtime_args, runtime_options
from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.executor.cuda_graph_runner import StaticInputs, capture_batch_sizes
from plait.runtime.executor.model_runner import ModelRunner
from tests.tiny_models import InMemorySource, tiny_hf_model


def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(5) == [1, 2, 4, 5]
    assert capture_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 100]
    sizes = capture_batch_sizes(256)
    assert sizes[-1] == 256 and sizes == sorted(set(sizes)) and len(sizes) == 21


def _batch(values: list[int]) -> SimpleNamespace:
    t = torch.tensor(values, dtype=torch.int64)
    return SimpleNamespace(batch_size=len(values), input_ids=t + 1000, positions=t + 2000, out_cache_loc=t + 3000,
                           req_pool_indices=t + 4000, seq_lens=t + 5000)


def test_static_inputs_pad_rows_are_always_dummies():
    """Whatever sequence of batch sizes came before, rows [n, bs) read as the dummy request."""
    max_bs = 48
    sizes = capture_batch_sizes(max_bs)
    inputs = StaticInputs(max_bs, "cpu")
    rng = random.Random(0)
    for step in range(300):
        n = rng.choice([rng.randrange(1, max_bs + 1), max_bs, 1])
        bs = next(s for s in sizes if s >= n)
        values = [rng.randrange(1, 100) for _ in range(n)]
        inputs.load(_batch(values), bs)
        v = torch.tensor(values)
        assert torch.equal(inputs.input_ids[:n], v + 1000) and torch.equal(inputs.seq_lens[:n], v + 5000)
        assert torch.equal(inputs.positions[:n], v + 2000) and torch.equal(inputs.out_cache_loc[:n], v + 3000)
        assert torch.equal(inputs.req_pool_indices[:n], v + 4000)
        for buf in (inputs.input_ids, inputs.positions, inputs.out_cache_loc, inputs.req_pool_indices):
            assert not buf[n:bs].any(), step
        assert (inputs.seq_lens[n:bs] == 1).all(), step


def test_flags_reach_the_model_config():
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    opts = runtime_options(parser.parse_args(["--disable-cuda-graph", "--cuda-graph-max-bs", "64",
                                              "--enable-torch-compile"]))
    assert opts["disable_cuda_graph"] is True and opts["cuda_graph_max_bs"] == 64 and opts["enable_torch_compile"]
    defaults = runtime_options(parser.parse_args([]))
    assert defaults["disable_cuda_graph"] is False and defaults["cuda_graph_max_bs"] == ModelConfig().cuda_graph_max_bs


def test_cpu_runner_has_no_graphs_and_reports_memory():
    runner = ModelRunner(ModelConfig(dtype="float32", device="cpu", enable_torch_compile=True),
                         MemoryConfig(max_total_tokens=1000, max_running_requests=7),
                         source=InMemorySource(tiny_hf_model("llama")))
    assert runner.graph_runner is None
    report = runner.memory_report
    assert report.kv_pool_tokens == 1000 and report.max_running_requests == 7 and report.graph_bytes == 0
    assert report.weights_bytes == 4 * runner.num_params
    assert report.kv_pool_bytes == 1000 * 2 * 2 * 2 * 16 * 4  # tokens x K,V x layers x kv heads x head_dim x fp32
    assert "KV pool 1000 tokens" in str(report)
