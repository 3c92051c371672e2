"""Overlap scheduling gives the same results as the plain loop.

The same workloads run with overlap forced on (on the CPU nothing actually overlaps, but the loop
takes the same deferred path as on CUDA: tokens are read back one step late and the next decode
takes its inputs from the device) and off, on a tiny float32 model: mixed lengths, stop tokens and
strings, max_new_tokens 0 and 1, n > 1, seeded sampling with penalties, logprobs across chunks,
aborts mid-run, a pool small enough to force retraction and eviction, constrained requests with
jump-forward. Outputs and meta_info must be identical, and the pool whole after every step.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from plait.runtime.engine import Engine
from plait.runtime.frontend.messages import AbortRequest, GenerateRequest
from plait.runtime.scheduler.scheduler import Scheduler
from plait.sampling_params import SamplingParams
from tests.tiny_models import InMemorySource, tiny_hf_model

VOCAB = 320
# Depend on when memory ran short, which overlap shifts by a step (outputs do not).
SCHEDULE_DEPENDENT = ("cached_tokens", "num_retractions")


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("llama", seed=5)


def make_engine(source, overlap: bool, **options) -> Engine:
    defaults = {"dtype": "float32", "device": "cpu", "max_total_tokens": 4096, "debug_check_integrity": True}
    return Engine(source=source, enable_overlap_schedule=overlap, **{**defaults, **options})


def assert_drained(engine: Engine) -> None:
    sched = engine.scheduler
    assert not sched.has_work and sched.inflight is None
    sched.check_integrity()
    cache = sched.cache.cache
    assert cache.protected_size == 0
    assert engine.runner.allocator.num_free_slots + cache.total_size == engine.runner.kv_pool.num_slots
    assert engine.runner.req_to_token_pool.num_free_rows == engine.runner.req_to_token_pool.num_rows


def comparable(results: list[dict], drop: tuple[str, ...] = ()) -> list[dict]:
    out = []
    for r in results:
        meta = {k: v for k, v in r["meta_info"].items() if k not in ("id", "e2e_latency") and k not in drop}
        out.append({**r, "meta_info": meta})
    return out


def assert_same(a, b, path: str = "") -> None:
    """Equal, with float logprobs within 1e-5 (batch composition may change the last bits)."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def run_both(source, run, *, drop: tuple[str, ...] = (), **options) -> tuple[list, list, list[dict]]:
    """`run(engine)` with overlap off and on; returns both results (comparable) and both server infos."""
    results, infos = [], []
    for overlap in (False, True):
        with make_engine(source, overlap, **options) as engine:
            assert engine.scheduler.overlap is overlap
            results.append(comparable(run(engine), drop))
            assert_drained(engine)
            infos.append(engine.get_server_info()["internal_states"][0])
    assert infos[0]["scheduler"]["overlapped_steps"] == 0 and infos[1]["scheduler"]["overlapped_steps"] > 0
    assert_same(results[0], results[1])
    return results[0], results[1], infos


def prompts(seed: int = 0, n: int = 14) -> list[list[int]]:
    """Groups sharing long prefixes plus unrelated prompts, of mixed lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(3):
        shared = [rng.randrange(VOCAB) for _ in range(rng.randrange(30, 60))]
        out += [shared + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(3)]
    out += [[rng.randrange(VOCAB) for _ in range(rng.randrange(5, 70))] for _ in range(n - len(out))]
    rng.shuffle(out)
    return out


def frequent_tokens(engine: Engine, ps: list[list[int]], k: int) -> list[int]:
    """Tokens the model often produces a few steps in: as stop tokens they end requests mid-run."""
    results = engine.generate(input_ids=ps, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
    counts: dict[int, int] = {}
    for r in results:
        for t in r["output_ids"][2:]:
            counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:k]


def test_mixed_lengths_stop_tokens_and_max_new_tokens_0_1(hf_model):
    source = InMemorySource(hf_model)
    ps = prompts()
    with make_engine(source, False) as engine:
        stops = frequent_tokens(engine, ps, 2)
    lengths = [0, 1, 2, 5, 17, 30, 9]
    params = [{"max_new_tokens": lengths[i % len(lengths)], "temperature": 0, "stop_token_ids": stops,
               "min_new_tokens": min(2, lengths[i % len(lengths)]) if i % 5 == 0 else 0} for i in range(len(ps))]
    off, _, _ = run_both(source, lambda e: e.generate(input_ids=ps, sampling_params=params))
    reasons = {r["meta_info"]["finish_reason"]["type"] for r in off}
    assert reasons == {"stop", "length"}, reasons
    assert any(r["meta_info"]["finish_reason"]["type"] == "stop" and r["meta_info"]["completion_tokens"] > 1
               for r in off), "no request stopped mid-run"
    assert {len(r["output_ids"]) for r, p in zip(off, params) if p["max_new_tokens"] == 0} == {0}
    assert {len(r["output_ids"]) for r, p in zip(off, params) if p["max_new_tokens"] == 1} == {1}


def test_requests_ending_by_length_take_no_extra_step(hf_model):
    source = InMemorySource(hf_model)
    ps = prompts(seed=1)
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    _, _, infos = run_both(source, lambda e: e.generate(input_ids=ps, sampling_params=params))
    assert infos[0]["scheduler"]["decode_steps"] == infos[1]["scheduler"]["decode_steps"]
    assert infos[0]["scheduler"]["generated_tokens"] == infos[1]["scheduler"]["generated_tokens"] == 12 * len(ps)


@pytest.mark.parametrize("options", [{"chunked_prefill_size": 16}, {"max_running_requests": 3},
                                     {"schedule_policy": "fcfs", "disable_radix_cache": True}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_scheduler_options(hf_model, options):
    source = InMemorySource(hf_model)
    ps = prompts(seed=2)
    params = [{"max_new_tokens": 3 + i % 11, "temperature": 0, "ignore_eos": True} for i in range(len(ps))]
    run_both(source, lambda e: e.generate(input_ids=ps, sampling_params=params), **options)


def test_n_seeded_sampling_and_penalties(hf_model):
    """Penalties and seeded streams depend on every earlier token: sampling must see the token that
    was in flight when the step was launched."""
    source = InMemorySource(hf_model)
    ps = prompts(seed=3, n=10)
    params = []
    for i in range(len(ps)):
        p = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 100 + i, "ignore_eos": True}
        if i % 2:
            p.update(frequency_penalty=0.8, presence_penalty=0.5, repetition_penalty=1.4)
        if i % 3 == 0:
            p.update(temperature=0, frequency_penalty=1.5)
        params.append(p)

    def run(engine):
        many = engine.generate(input_ids=ps[0], sampling_params={"n": 3, "max_new_tokens": 10, "temperature": 1.0,
                                                                 "seed": 7, "presence_penalty": 1.0})
        return engine.generate(input_ids=ps, sampling_params=params) + many

    off, _, _ = run_both(source, run)
    assert len(off) == len(ps) + 3
    # The penalties act: without them the greedy rows would repeat (the tiny model loops).
    with make_engine(source, True) as engine:
        plain = engine.generate(input_ids=ps[0], sampling_params={"max_new_tokens": 16, "temperature": 0,
                                                                  "ignore_eos": True})
    assert plain["output_ids"] != off[0]["output_ids"]


def test_logprobs_across_chunks(hf_model):
    source = InMemorySource(hf_model)
    ps = prompts(seed=4, n=10)
    starts = [0, 5, 20, -1, 0]

    def run(engine):
        return engine.generate(
            input_ids=ps,
            sampling_params=[{"max_new_tokens": 4 + i % 5, "temperature": 0, "ignore_eos": True} for i in range(len(ps))],
            return_logprob=True,
            logprob_start_len=[starts[i % len(starts)] for i in range(len(ps))],
            top_logprobs_num=[3 if i % 2 else 0 for i in range(len(ps))],
            token_ids_logprob=[[1, 2, 3] if i % 3 == 0 else None for i in range(len(ps))],
        )

    off, _, _ = run_both(source, run, chunked_prefill_size=16)
    meta = off[0]["meta_info"]
    assert meta["input_token_logprobs"] and meta["output_token_logprobs"]
    assert len(meta["input_token_logprobs"]) == len(ps[0])  # logprob_start_len 0: every prompt token


def test_tiny_pool_retracts_and_evicts(hf_model):
    source = InMemorySource(hf_model)
    ps = prompts(seed=5)
    params = [{"max_new_tokens": 12 + i % 7, "temperature": 0, "ignore_eos": True} for i in range(len(ps))]
    _, _, infos = run_both(source, lambda e: e.generate(input_ids=ps, sampling_params=params),
                           drop=SCHEDULE_DEPENDENT, max_total_tokens=160, chunked_prefill_size=32)
    for info in infos:
        assert info["scheduler"]["retractions"] > 0 and info["cache"]["evicted_tokens"] > 0, info


def test_retraction_with_stops_under_a_tiny_pool(hf_model):
    """Retraction picks requests whose token is in flight. In this workload one of them ends on that
    token while it waits in the queue, and others stop while their extra step runs."""
    source = InMemorySource(hf_model)
    ps = [[(i * 7) % 300 + 1] * 20 for i in range(6)]
    with make_engine(source, False) as engine:
        stops = frequent_tokens(engine, ps, 4)
    params = {"max_new_tokens": 30, "temperature": 0, "stop_token_ids": stops}
    off, _, infos = run_both(source, lambda e: e.generate(input_ids=ps, sampling_params=params), drop=SCHEDULE_DEPENDENT,
                             max_total_tokens=120, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    assert infos[1]["scheduler"]["retractions"] > 0
    assert {r["meta_info"]["finish_reason"]["type"] for r in off} == {"stop", "length"}


def drive(engine: Engine, script) -> dict[str, dict]:
    """Run the scheduler by hand (deterministic step counts); `script(step, sched)` may submit or abort."""
    engine.shutdown()
    outputs = []
    sched = Scheduler(engine.runner, engine.config.scheduler, on_output=outputs.extend)
    step = 0
    while step < 400:
        script(step, sched)
        if not (sched.has_work or not sched.inbox.empty()) and step > 20:
            break
        sched.step()
        sched.check_integrity()
        step += 1
    assert not sched.has_work
    sched.check_integrity()
    assert sched.cache.cache.protected_size == 0
    assert engine.runner.allocator.num_free_slots + sched.cache.cache.total_size == engine.runner.kv_pool.num_slots
    results: dict[str, dict] = {}
    for out in outputs:
        r = results.setdefault(out.rid, {"ids": [], "finished": 0})
        del r["ids"][len(r["ids"]) - out.num_dropped_ids :]
        r["ids"] += out.new_output_ids
        r["finished"] += out.finished
        r["reason"] = out.finish_reason
    assert all(r["finished"] == 1 for r in results.values()), "every request ends exactly once"
    return results


def test_aborts_mid_run(hf_model):
    source = InMemorySource(hf_model)
    ps = prompts(seed=6, n=8)
    greedy = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    short = SamplingParams(max_new_tokens=1, temperature=0)
    prefill = SamplingParams(max_new_tokens=0)

    def script(step, sched):
        if step == 0:
            for i, p in enumerate(ps):
                sched.submit(GenerateRequest(rid=f"r{i}", input_ids=p, sampling_params=greedy, stream=i % 2 == 0))
        if step == 3:
            sched.submit(AbortRequest("r1"))  # running
            sched.submit(GenerateRequest(rid="one", input_ids=ps[0] + [9], sampling_params=short))
            sched.submit(GenerateRequest(rid="zero", input_ids=ps[1] + [9], sampling_params=prefill))
        if step == 4:
            sched.submit(AbortRequest("one"))  # aborted while its only token is in flight
            sched.submit(AbortRequest("zero"))
        if step == 6:
            sched.submit(AbortRequest("r2"))
            sched.submit(GenerateRequest(rid="late", input_ids=ps[3], sampling_params=greedy))
        if step == 8:
            sched.submit(AbortRequest("late"))  # just admitted

    runs = []
    for overlap in (False, True):
        with make_engine(source, overlap, max_total_tokens=400, chunked_prefill_size=32) as engine:
            runs.append(drive(engine, script))
            engine_ref = engine
    off, on = runs
    assert off.keys() == on.keys()
    aborted = {"r1", "r2", "late"}
    for rid in aborted:
        assert off[rid]["reason"]["type"] == on[rid]["reason"]["type"] == "abort"
    for rid in off.keys() - aborted - {"one", "zero"}:
        assert off[rid] == on[rid], rid
        assert len(off[rid]["ids"]) == 20
    for rid in ("one", "zero"):  # aborted while ending (overlap: "one" still runs): either result is right
        assert on[rid]["reason"]["type"] in ("abort", "length")
    del engine_ref


def test_overlap_reads_tokens_one_step_late(hf_model):
    """The mechanism itself: after a step the batch is still in flight, and the next decode runs
    on the device's copy of tokens the host has not read yet."""
    source = InMemorySource(hf_model)
    for overlap in (False, True):
        with make_engine(source, overlap) as engine:
            engine.shutdown()
            outputs = []
            sched = Scheduler(engine.runner, engine.config.scheduler, on_output=outputs.extend)
            params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
            for i in range(3):
                sched.submit(GenerateRequest(rid=f"r{i}", input_ids=[i + 1] * 10, sampling_params=params))
            sched.step()  # the prefill
            reqs = list(sched.running)
            assert len(reqs) == 3
            if overlap:
                assert sched.inflight is not None and all(r.inflight == 1 and not r.output_ids for r in reqs)
                sched.step()  # first decode launched, then the prefill's tokens read
                assert all(r.inflight == 1 and len(r.output_ids) == 1 for r in reqs)
                assert all(r.kv_committed_len == len(r.fill_ids) for r in reqs)
            else:
                assert sched.inflight is None and all(r.inflight == 0 and len(r.output_ids) == 1 for r in reqs)
            while sched.has_work:
                sched.step()
            assert sorted(o.rid for o in outputs if o.finished) == ["r0", "r1", "r2"]


# ---- text: stop strings, streaming, constrained decoding --------------------------------------------
@pytest.fixture(scope="module")
def text_source(default_tokenizer):
    cfg = transformers.LlamaConfig(
        vocab_size=len(default_tokenizer.hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return InMemorySource(hf, tokenizer=default_tokenizer)


def test_stop_strings_and_streaming(text_source):
    prompts_text = ["Hello there, how are you", "The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    with make_engine(text_source, False) as engine:
        free = engine.generate(prompts_text, {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True})
    # A stop string from the middle of each output (a few characters that straddle tokens or not).
    stops = [r["text"][len(r["text"]) // 2 : len(r["text"]) // 2 + 3] for r in free]
    params = [{"max_new_tokens": 24, "temperature": 0, "stop": [s] if s.strip() else [], "ignore_eos": True}
              for s in stops]

    def run(engine):
        batch = engine.generate(prompts_text, params)
        snapshots = [s["text"] for s in engine.generate(prompts_text[0], params[0], stream=True)]
        # each snapshot extends the one before; how many there are depends on timing (a slow reader
        # gets several tokens in one), so only the final text is compared between the two schedules
        assert all(b.startswith(a) for a, b in zip(snapshots, snapshots[1:]))
        return batch + [{"text": snapshots[-1], "output_ids": [], "meta_info": {}}]

    off, _, _ = run_both(text_source, run)
    assert any(r["meta_info"]["finish_reason"]["type"] == "stop" for r in off[:-1])


def test_constrained_requests_with_jump_forward(text_source):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}

    def run(engine):
        params = [
            {"max_new_tokens": 48, "temperature": 1.0, "seed": 5, "json_schema": json.dumps(schema)},
            {"max_new_tokens": 32, "temperature": 1.0, "seed": 6, "regex": r"(yes|no), [a-z]{2,6}\."},
            {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True},  # free, in the same batch
            {"max_new_tokens": 48, "temperature": 0, "json_schema": json.dumps(schema)},
            {"max_new_tokens": 40, "temperature": 1.0, "seed": 8, "regex": r"[a-z ]{5,30}", "stop": [" e"]},
        ]
        return engine.generate(["JSON:", "Answer:", "Free text", "Person:", "Words:"], params)

    off, _, infos = run_both(text_source, run)
    assert all(r["meta_info"]["finish_reason"]["type"] in ("stop", "length") for r in off)
    for r in (off[0], off[3]):
        if r["meta_info"]["finish_reason"]["type"] == "stop":
            assert set(json.loads(r["text"])) == {"name", "age"}
    assert infos[1]["grammar"]["jumps"] > 0
