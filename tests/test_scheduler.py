"""The scheduler and Engine on a tiny random model: identical greedy outputs under every cache mode,
chunking, policy and memory pressure; no slot leaked; starvation bounded by aging; request options."""

from __future__ import annotations

import random

import pytest
import torch

from plait.runtime.engine import Engine
from plait.runtime.frontend.messages import GenerateRequest
from plait.runtime.scheduler.scheduler import Scheduler
from plait.sampling_params import SamplingParams
from tests.tiny_models import InMemorySource, tiny_hf_model

VOCAB = 320


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("llama", seed=5)


def make_engine(hf_model, **options) -> Engine:
    defaults = dict(dtype="float32", device="cpu", max_total_tokens=4096, debug_check_integrity=True)
    defaults.update(options)
    return Engine(source=InMemorySource(hf_model), **defaults)


def workload(seed: int = 0) -> list[list[int]]:
    """Prompts in groups sharing long prefixes, plus unrelated ones, of mixed lengths."""
    rng = random.Random(seed)
    prompts = []
    for length in (40, 70, 100):  # the longer shared prefixes take the cascade decode path
        shared = [rng.randrange(VOCAB) for _ in range(length + rng.randrange(10))]
        for _ in range(3):
            prompts.append(shared + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))])
    prompts += [[rng.randrange(VOCAB) for _ in range(rng.randrange(5, 70))] for _ in range(4)]
    rng.shuffle(prompts)
    return prompts


GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def run_all(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    results = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    return [r["output_ids"] for r in results]


def assert_drained(engine: Engine) -> None:
    sched = engine.scheduler
    assert not sched.has_work
    sched.check_integrity()  # free + evictable + protected == total with nothing private
    cache = sched.cache.cache
    assert cache.protected_size == 0
    assert engine.runner.allocator.num_free_slots + cache.total_size == engine.runner.kv_pool.num_slots
    assert engine.runner.req_to_token_pool.num_free_rows == engine.runner.req_to_token_pool.num_rows


@pytest.fixture(scope="module")
def reference(hf_model):
    """Greedy outputs from Hugging Face forward passes (full recompute each step), one prompt at a time."""
    outs = []
    for p in workload():
        ids = list(p)
        with torch.no_grad():
            for _ in range(GREEDY["max_new_tokens"]):
                ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
        outs.append(ids[len(p):])
    return outs


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"disable_radix_cache": True},
        {"prefix_cache": "flat"},
        {"chunked_prefill_size": 16},
        {"chunked_prefill_size": 7, "max_prefill_tokens": 20},
        {"schedule_policy": "fcfs"},
        {"schedule_policy": "dfs-weight"},
        {"schedule_policy": "lof"},
        {"schedule_policy": "random"},
        {"max_running_requests": 2},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_greedy_outputs_identical_to_reference(hf_model, reference, options):
    with make_engine(hf_model, **options) as engine:
        assert run_all(engine, workload()) == reference
        # A second pass hits the cache (when there is one) and must not change anything.
        assert run_all(engine, workload()) == reference
        assert_drained(engine)


def test_shared_prefixes_decode_through_the_cascade_path(hf_model, reference, monkeypatch):
    from plait.runtime.attention import torch_native

    calls = []
    attend = torch_native._attend_shared_prefixes

    def counting(q, k_buf, v_buf, shared, layer):
        calls.append(shared.slots.shape[0])
        return attend(q, k_buf, v_buf, shared, layer)

    monkeypatch.setattr(torch_native, "_attend_shared_prefixes", counting)
    with make_engine(hf_model, attention_backend="torch_native", disable_cpu_kernels=True) as engine:
        assert run_all(engine, workload()) == reference
    assert calls and max(calls) >= 2  # steps where two groups shared their prefixes in one product


@pytest.mark.parametrize("graph", [True, False], ids=["cpu-graph", "cpu-kernels-eager"])
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed-chunks", "separate-steps"])
def test_shared_prefixes_through_the_cpu_cascade(hf_model, reference, monkeypatch, graph, mixed):
    """The CPU kernels' backend attends each group's shared prefix once (the scheduler's groups from
    the prefix tree), in decode steps and in extend steps (prompts over a cached prefix, and with mixed
    chunks the decodes riding along), in the native stack and layer by layer; outputs stay the
    reference's."""
    from plait.runtime.attention.cpu_backend import CpuBackend
    from plait.runtime.cpu import kernels
    from plait.runtime.executor.forward_batch import ForwardMode

    if not kernels.available():
        pytest.skip("the CPU kernels are not built here")
    cascades = []  # (mode, number of groups) of the steps that took the cascade
    build = CpuBackend.init_forward_metadata

    def recording(self, batch):
        build(self, batch)
        if batch.attn_metadata.prefixes is not None:
            cascades.append((batch.mode, batch.attn_metadata.prefixes.q_len.numel()))

    monkeypatch.setattr(CpuBackend, "init_forward_metadata", recording)
    options = {"disable_cpu_graph": not graph, ("enable_mixed_chunk" if mixed else "disable_mixed_chunk"): True}
    with make_engine(hf_model, **options) as engine:
        assert engine.runner.execution["attention_backend"] == "cpu"
        assert engine.scheduler.mixed_chunk == mixed
        assert run_all(engine, workload()) == reference
    assert max(n for mode, n in cascades if mode is ForwardMode.DECODE) >= 2  # two groups each read their prefix once
    assert any(mode is ForwardMode.EXTEND for mode, _ in cascades)


def test_shared_prefix_groups_read_off_the_tree_match_the_rows(hf_model, reference, monkeypatch):
    """The groups the scheduler hands to shared-prefix backends (from the prefix tree, no device
    reads): every member's req_to_token row starts with the same slots for the shared length, which
    is below its length; the workload's two long-prefix groups are found; outputs are unchanged."""
    from plait.runtime.scheduler.cache_manager import CacheManager

    seen = []
    find = CacheManager.shared_prefix_groups

    def checking(reqs, **kw):
        groups = find(reqs, **kw)
        for members, prefix_len in groups:
            rows = torch.stack([req_to_token[reqs[i].req_pool_idx, :prefix_len] for i in members])
            assert (rows == rows[0]).all() and prefix_len >= 64
            assert all(prefix_len < reqs[i].kv_committed_len + 1 for i in members)
            assert len(members) >= 2
        members = [i for m, _ in groups for i in m]
        assert len(members) == len(set(members))  # a request in one group at most
        seen.append(sorted(len(m) for m, _ in groups))
        return groups

    monkeypatch.setattr(CacheManager, "shared_prefix_groups", staticmethod(checking))
    with make_engine(hf_model, shared_prefix_decode_min_tokens=1) as engine:
        monkeypatch.setattr(engine.runner.attn_backend, "supports_shared_prefix_decode", True)
        req_to_token = engine.runner.req_to_token_pool.req_to_token
        assert run_all(engine, workload()) == reference
    assert [3, 3] in seen  # both groups (prefixes of 70+ and 100+ tokens) decoding together
    with make_engine(hf_model, shared_prefix_decode_min_tokens=1, disable_shared_prefix_decode=True) as engine:
        monkeypatch.setattr(engine.runner.attn_backend, "supports_shared_prefix_decode", True)
        seen.clear()
        run_all(engine, workload())
    assert seen == []


def test_memory_pressure_evicts_and_retracts_without_changing_outputs(hf_model, reference):
    # A pool far smaller than the workload: admission must wait, decode must retract.
    with make_engine(hf_model, max_total_tokens=160, chunked_prefill_size=32) as engine:
        assert run_all(engine, workload()) == reference
        state = engine.get_server_info()["internal_states"][0]
        assert state["scheduler"]["retractions"] > 0 or state["cache"]["evicted_tokens"] > 0
        assert_drained(engine)


def test_retraction_happens_under_a_tiny_pool(hf_model):
    prompts = [[i + 1] * 20 for i in range(6)]
    with make_engine(hf_model, max_total_tokens=120, init_new_token_ratio=0.0, min_new_token_ratio=0.0) as engine:
        results = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 30, "temperature": 0, "ignore_eos": True})
        assert all(r["meta_info"]["completion_tokens"] == 30 for r in results)
        assert engine.get_server_info()["internal_states"][0]["scheduler"]["retractions"] > 0
        assert_drained(engine)
        # The retracted requests resumed where they were: same output as each alone.
        for p, r in zip(prompts, results):
            alone = engine.generate(input_ids=p, sampling_params={"max_new_tokens": 30, "temperature": 0, "ignore_eos": True})
            assert alone["output_ids"] == r["output_ids"]


def test_cached_tokens_reported(hf_model):
    prompt = list(range(10, 60))
    with make_engine(hf_model) as engine:
        first = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
        assert first["meta_info"]["cached_tokens"] == 0
        again = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
        assert again["meta_info"]["cached_tokens"] == len(prompt) - 1  # one token is always computed
        assert again["output_ids"] == first["output_ids"]
        longer = engine.generate(input_ids=prompt + [7, 8, 9], sampling_params={"max_new_tokens": 1})
        assert longer["meta_info"]["cached_tokens"] >= len(prompt)
        assert engine.get_server_info()["internal_states"][0]["cache"]["hit_rate"] > 0


def test_prefill_only_warms_the_cache(hf_model):
    prompt = list(range(100, 140))
    with make_engine(hf_model) as engine:
        warm = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0})
        assert warm["output_ids"] == [] and warm["meta_info"]["finish_reason"]["type"] == "length"
        hit = engine.generate(input_ids=prompt + [1], sampling_params={"max_new_tokens": 2})
        assert hit["meta_info"]["cached_tokens"] == len(prompt)


def test_n_samples_share_the_prompt_kv(hf_model):
    prompt = list(range(1, 80))
    with make_engine(hf_model) as engine:
        results = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 5, "n": 4, "temperature": 1.0})
        assert len(results) == 4
        cached = sorted(r["meta_info"]["cached_tokens"] for r in results)
        assert cached[0] == 0 and all(c == len(prompt) - 1 for c in cached[1:])
        assert engine.get_server_info()["internal_states"][0]["scheduler"]["extend_steps"] <= 3


def test_stop_token_ids_and_min_new_tokens(hf_model):
    prompt = [5, 6, 7]
    with make_engine(hf_model) as engine:
        free = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 10, "temperature": 0})
        stop_at = free["output_ids"][3]
        first_index = free["output_ids"].index(stop_at)
        stopped = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 10, "temperature": 0, "stop_token_ids": [stop_at]})
        assert stopped["output_ids"] == free["output_ids"][: first_index + 1]
        assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
        held = engine.generate(
            input_ids=prompt,
            sampling_params={"max_new_tokens": 10, "temperature": 0, "stop_token_ids": [stop_at], "min_new_tokens": 6},
        )
        assert len(held["output_ids"]) >= 6
        assert stop_at not in held["output_ids"][:6]


def _streamed_lengths(sched: Scheduler, rid: str, params: SamplingParams) -> tuple[list[int], list[int]]:
    """Drive one streamed request to its end: (tokens in each message, all of its tokens)."""
    outputs = []
    sched.on_output = outputs.extend
    sched.submit(GenerateRequest(rid=rid, input_ids=list(range(1, 20)), sampling_params=params, stream=True))
    while sched.has_work or not sched.inbox.empty():
        sched.step()
    mine = [o for o in outputs if o.rid == rid]
    assert mine[-1].finished and all(not o.finished for o in mine[:-1])
    return [len(o.new_output_ids) for o in mine], [t for o in mine for t in o.new_output_ids]


def test_stream_interval_groups_streamed_tokens(hf_model):
    """`--stream-interval N`: the first token goes out alone, then N at a time, the rest at the end; a
    request's own `stream_interval` overrides the server's; the tokens are the same either way."""
    engine = make_engine(hf_model, stream_interval=4)
    engine.shutdown()  # drive the scheduler by hand
    sched = Scheduler(engine.runner, engine.config.scheduler, on_output=None)
    greedy = dict(max_new_tokens=11, temperature=0, ignore_eos=True)
    sizes, grouped = _streamed_lengths(sched, "server", SamplingParams(**greedy))
    assert sizes == [1, 4, 4, 2]
    sizes, own = _streamed_lengths(sched, "own", SamplingParams(stream_interval=1, **greedy))
    assert sizes == [1] * 11 and own == grouped
    sizes, _ = _streamed_lengths(sched, "five", SamplingParams(stream_interval=5, **greedy))
    assert sizes == [1, 5, 5]
    # Not streamed: one message at the end whatever the interval.
    outputs = []
    sched.on_output = outputs.extend
    sched.submit(GenerateRequest(rid="whole", input_ids=list(range(1, 20)), sampling_params=SamplingParams(**greedy)))
    while sched.has_work or not sched.inbox.empty():
        sched.step()
    assert [len(o.new_output_ids) for o in outputs] == [11]
    with pytest.raises(ValueError, match="stream-interval"):
        make_engine(hf_model, stream_interval=0)


def test_abort_frees_everything(hf_model):
    with make_engine(hf_model) as engine:
        stream = engine.generate(input_ids=list(range(1, 30)), sampling_params={"max_new_tokens": 450, "ignore_eos": True}, stream=True)
        first = next(stream)
        assert first["meta_info"]["finish_reason"] is None
        stream.close()  # closing the stream aborts the request
        # wait for the scheduler to process the abort
        for _ in range(200):
            if not engine.scheduler.has_work:
                break
            import time
            time.sleep(0.01)
        assert_drained(engine)


def test_bad_requests_are_rejected_clearly(hf_model):
    from plait.runtime.frontend.errors import InvalidRequestError

    with make_engine(hf_model) as engine:
        with pytest.raises(InvalidRequestError, match="context length"):
            engine.generate(input_ids=[i % 300 for i in range(600)], sampling_params={"max_new_tokens": 1})
        with pytest.raises(InvalidRequestError, match="empty"):
            engine.generate(input_ids=[], sampling_params={})
        with pytest.raises(InvalidRequestError, match="temperature"):
            engine.generate(input_ids=[1], sampling_params={"temperature": -1})
        with pytest.raises(InvalidRequestError, match="unknown sampling parameter"):
            engine.generate(input_ids=[1], sampling_params={"temprature": 1})


def _drive_starvation(hf_model, aging_rounds: int, rounds: int) -> tuple[bool, int]:
    """A stream of requests sharing a cached prefix keeps arriving; one unrelated request waits.
    Under lpm without aging the unrelated one never gets a turn while the stream lasts."""
    engine = make_engine(hf_model, schedule_aging_rounds=aging_rounds, max_running_requests=2, schedule_policy="lpm")
    engine.shutdown()  # drive the scheduler by hand, deterministically
    outputs = []
    sched = Scheduler(engine.runner, engine.config.scheduler, on_output=outputs.extend)
    hot = list(range(1, 65))
    params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
    sched.submit(GenerateRequest(rid="warm", input_ids=hot + [1], sampling_params=params))
    while sched.has_work or not sched.inbox.empty():
        sched.step()
    sched.submit(GenerateRequest(rid="victim", input_ids=[300, 301, 302, 303], sampling_params=params))
    victim_admitted_at = None
    for i in range(rounds):
        sched.submit(GenerateRequest(rid=f"hot{i}a", input_ids=hot + [i % VOCAB, 7], sampling_params=params))
        sched.submit(GenerateRequest(rid=f"hot{i}b", input_ids=hot + [i % VOCAB, 8], sampling_params=params))
        sched.step()
        victim = next((r for r in sched.running + ([sched.chunked] if sched.chunked else []) if r.rid == "victim"), None)
        if victim_admitted_at is None and (victim is not None or any(o.rid == "victim" for o in outputs)):
            victim_admitted_at = i
    return victim_admitted_at is not None, victim_admitted_at


def test_lpm_starves_without_aging_and_not_with_it(hf_model):
    admitted, _ = _drive_starvation(hf_model, aging_rounds=0, rounds=60)
    assert not admitted, "without aging, lpm should keep preferring the cached stream"
    admitted, at = _drive_starvation(hf_model, aging_rounds=8, rounds=60)
    # The bound: passed over at most `aging_rounds` admission rounds, each at most 2 steps here.
    assert admitted and at <= 2 * 8 + 2, at


def test_dfs_weight_puts_cached_subtrees_before_unmatched_requests(hf_model):
    from plait.runtime.scheduler.policy import SchedulePolicy
    from plait.runtime.scheduler.request import Req

    with make_engine(hf_model) as engine:
        hot = list(range(1, 40))
        engine.generate(input_ids=hot + [1], sampling_params={"max_new_tokens": 1})
        cache = engine.scheduler.cache
        params = SamplingParams(max_new_tokens=1)
        cold = Req(GenerateRequest(rid="cold", input_ids=[300, 301, 302], sampling_params=params), eos_token_ids=[])
        warm = [Req(GenerateRequest(rid=f"w{i}", input_ids=hot + [i, 9], sampling_params=params), eos_token_ids=[])
                for i in range(2)]
        order = SchedulePolicy("dfs-weight", aging_rounds=0).order([cold, *warm], cache)
        assert order[-1].rid == "cold" and {r.rid for r in order[:2]} == {"w0", "w1"}
