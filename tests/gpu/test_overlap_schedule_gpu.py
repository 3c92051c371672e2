"""Overlap scheduling on CUDA: outputs identical with overlap on (the CUDA default) and off, on a tiny
float32 model, with stop tokens ending requests mid-run, max_new_tokens 0 and 1, seeded sampling with
penalties, logprobs, and a pool small enough to force retraction; the pool whole after every step."""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from plait.runtime.engine import Engine
from tests.test_overlap_schedule import assert_drained, assert_same, comparable
from tests.tiny_models import InMemorySource, tiny_hf_model

pytestmark = pytest.mark.gpu
VOCAB = 320


@pytest.fixture(scope="module")
def source():
    return InMemorySource(tiny_hf_model("llama", seed=5))


def engine(source, *, overlap: bool, **options) -> Engine:
    defaults = {"dtype": "float32", "device": "cuda", "max_total_tokens": 8192, "max_running_requests": 32,
                    "debug_check_integrity": True}
    return Engine(source=source, disable_overlap_schedule=not overlap, **{**defaults, **options})


def workload(seed: int, n: int = 24) -> tuple[list[list[int]], list[dict]]:
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(80)]
    prompts = [(shared if i % 3 == 0 else []) + [rng.randrange(VOCAB) for _ in range(rng.randrange(3, 150))]
               for i in range(n)]
    params = []
    for i in range(n):
        p = {"max_new_tokens": [0, 1, 2, 7, 19, 33][i % 6], "temperature": 0, "stop_token_ids": [7, 11, 13]}
        if i % 4 == 1:
            p.update(temperature=0.8, top_p=0.9, seed=i, frequency_penalty=0.5, repetition_penalty=1.2)
        params.append(p)
    return prompts, params


def run(eng: Engine, prompts, params) -> list[dict]:
    results = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True, top_logprobs_num=2)
    return comparable(results, ("cached_tokens", "num_retractions"))


@pytest.mark.parametrize("options", [{}, {"max_total_tokens": 600, "chunked_prefill_size": 64}],
                         ids=["default", "tiny-pool"])
def test_outputs_identical_with_and_without_overlap(source, options):
    prompts, params = workload(seed=1)
    results = []
    for overlap in (False, True):
        with engine(source, overlap=overlap, **options) as eng:
            assert eng.scheduler.overlap is overlap
            results.append(run(eng, prompts, params))
            info = eng.get_server_info()
            assert (info["overlapped_steps"] > 0) is overlap
            assert_drained(eng)
    assert_same(results[0], results[1])
    assert {r["meta_info"]["finish_reason"]["type"] for r in results[0]} == {"stop", "length"}


def test_overlap_is_the_cuda_default(source):
    with Engine(source=source, dtype="float32", device="cuda", max_total_tokens=2048, max_running_requests=4) as eng:
        assert eng.scheduler.overlap


def test_one_batch_overlapped_loop_matches_sync(source):
    """plait.bench.one_batch's overlapped decode loop (the GPU default) computes what the synchronous one does."""
    from plait.bench.one_batch import run_static_batch
    from plait.runtime.config import MemoryConfig, ModelConfig
    from plait.runtime.executor.model_runner import ModelRunner

    runner = ModelRunner(ModelConfig(dtype="float32", device="cuda"),
                         MemoryConfig(max_total_tokens=4096, max_running_requests=8), source=source)
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 40, 17)]
    sync, _ = run_static_batch(runner, prompts, 24)
    overlapped, _ = run_static_batch(runner, prompts, 24, overlap=True)
    assert len(sync.last_token_ids) == 3 and list(overlapped.last_token_ids) == list(sync.last_token_ids)
    assert len(overlapped.decode_latencies_s) == len(sync.decode_latencies_s) == 23
