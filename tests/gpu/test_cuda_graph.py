"""CUDA graphs for decode: greedy outputs identical with graphs on and off (and with torch.compile),
on a tiny float32 model, over batch sizes that hit captured sizes, padded ones and the eager fallback."""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.engine import Engine
from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch
from plait.runtime.executor.model_runner import ModelRunner
from tests.tiny_models import InMemorySource, tiny_hf_model

pytestmark = pytest.mark.gpu
VOCAB = 320
MAX_BS = 16  # captured: 1, 2, 4, 8, 16


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("llama", seed=3)


def engine(hf_model, **options) -> Engine:
    defaults = {"dtype": "float32", "device": "cuda", "attention_backend": "triton", "max_total_tokens": 8192,
                "max_running_requests": 32, "cuda_graph_max_bs": MAX_BS, "debug_check_integrity": True}
    return Engine(source=InMemorySource(hf_model), **{**defaults, **options})


def workload(num_prompts: int, seed: int) -> tuple[list[list[int]], list[dict]]:
    """Mixed prompt lengths and mixed output lengths, so the decode batch shrinks step by step
    through captured and padded sizes."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 200))] for _ in range(num_prompts)]
    params = [{"max_new_tokens": rng.randrange(1, 24), "temperature": 0, "ignore_eos": True} for _ in prompts]
    return prompts, params


def run(eng: Engine, prompts, params) -> list[list[int]]:
    return [out["output_ids"] for out in eng.generate(input_ids=prompts, sampling_params=params)]


@pytest.fixture(scope="module")
def eager_outputs(hf_model):
    with engine(hf_model, disable_cuda_graph=True) as eng:
        assert eng.runner.graph_runner is None
        yield {n: run(eng, *workload(n, seed=n)) for n in (1, 3, 5, 13, 16, 27)}


@pytest.mark.parametrize("options", [{}, {"enable_torch_compile": True}], ids=["graphs", "graphs+compile"])
def test_greedy_outputs_identical_with_graphs(hf_model, eager_outputs, options):
    with engine(hf_model, **options) as eng:
        graphs = eng.runner.graph_runner
        assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 8, 16]
        for n, expected in eager_outputs.items():
            before = graphs.num_replays
            assert run(eng, *workload(n, seed=n)) == expected, f"{n} prompts"
            assert graphs.num_replays > before  # the decode steps really replayed graphs
        assert eng.runner.memory_report.graph_bytes > 0


def test_replay_logits_match_eager_for_padded_batches(hf_model):
    """Logits straight from the runner: every batch size 1..MAX_BS, padded ones included, after a
    larger batch left real values in the rows that become padding."""
    runner = ModelRunner(ModelConfig(dtype="float32", device="cuda", attention_backend="triton",
                                     cuda_graph_max_bs=MAX_BS),
                         MemoryConfig(max_total_tokens=4096, max_running_requests=MAX_BS),
                         source=InMemorySource(hf_model))
    graphs = runner.graph_runner
    rng = random.Random(0)
    rows = [runner.req_to_token_pool.alloc() for _ in range(MAX_BS)]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(2, 90))] for _ in rows]
    common = {"req_to_token_pool": runner.req_to_token_pool, "kv_pool": runner.kv_pool,
              "attn_backend": runner.attn_backend}
    slots = runner.allocator.alloc(sum(map(len, prompts)))
    runner.forward(make_extend_batch(req_pool_indices=rows, prefix_lens=[0] * len(rows), new_token_ids=prompts,
                                     out_cache_loc=slots, **common))
    seq_lens = [len(p) for p in prompts]
    for num_reqs in [MAX_BS, 3, 9, 1, 16, 5, 2, 12]:
        pick = rng.sample(range(MAX_BS), num_reqs)
        for i in pick:
            seq_lens[i] += 1
        batch = make_decode_batch(
            req_pool_indices=[rows[i] for i in pick], seq_lens=[seq_lens[i] for i in pick],
            last_token_ids=[rng.randrange(VOCAB) for _ in pick],
            out_cache_loc=runner.allocator.alloc(num_reqs), **common,
        )
        replays = graphs.num_replays
        with_graph = runner.forward(batch).next_token_logits
        assert graphs.num_replays == replays + 1
        runner.graph_runner = None
        try:
            eager = runner.forward(batch).next_token_logits  # rewrites the same KV slots with the same values
        finally:
            runner.graph_runner = graphs
        assert with_graph.shape == eager.shape == (num_reqs, VOCAB)
        torch.testing.assert_close(with_graph, eager, rtol=1e-4, atol=1e-4)


def test_larger_batches_fall_back_to_eager(hf_model):
    with engine(hf_model, cuda_graph_max_bs=4) as eng:
        graphs = eng.runner.graph_runner
        assert graphs.batch_sizes == [1, 2, 4]
        prompts = [[rng_id for rng_id in range(5 + i, 40 + i)] for i in range(12)]
        params = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
        before = graphs.num_replays
        eng.generate(input_ids=prompts, sampling_params=params)
        # 12 requests decode together: eager; no step of this batch fits a graph.
        assert graphs.num_replays == before


def test_greedy_outputs_identical_with_shared_prefix_decode(hf_model):
    """Groups of prompts sharing long prefixes: the scheduler hands the groups to the triton backend
    (prefix kernel, eager steps) and the outputs equal those with the path off (graph replays)."""
    rng = random.Random(7)
    prompts, params = [], []
    for prefix_len in (150, 300, 700):
        shared = [rng.randrange(VOCAB) for _ in range(prefix_len)]
        for _ in range(rng.randrange(3, 20)):
            prompts.append(shared + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))])
            params.append({"max_new_tokens": rng.randrange(4, 24), "temperature": 0, "ignore_eos": True})
    expected_eng = engine(hf_model, disable_shared_prefix_decode=True)
    with expected_eng as eng:
        expected = run(eng, prompts, params)
    from plait.runtime.attention import triton_backend

    planned = []
    plan = triton_backend.shared_prefix_plan

    def counting(groups, *args, **kwargs):
        planned.append(len(groups))
        return plan(groups, *args, **kwargs)

    triton_backend.shared_prefix_plan = counting
    try:
        with engine(hf_model, shared_prefix_decode_min_tokens=1) as eng:
            assert run(eng, prompts, params) == expected
    finally:
        triton_backend.shared_prefix_plan = plan
    assert planned and max(planned) >= 2  # steps where several groups took the prefix kernel
