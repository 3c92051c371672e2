"""The tiered cache under the scheduler: greedy outputs unchanged by tier moves (float32), loads
cancelled by aborts, workflow hints through the Engine, the HTTP server and the frontend."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

import plait
from plait.runtime.engine import Engine
from plait.runtime.frontend.errors import InvalidRequestError
from plait.runtime.frontend.messages import AbortRequest, GenerateRequest
from plait.runtime.scheduler.scheduler import Scheduler
from plait.sampling_params import SamplingParams
from tests.test_scheduler import GREEDY, assert_drained, make_engine, run_all, workload
from tests.test_server_utils import ServerProcess, post, write_tiny_model
from tests.tiny_models import tiny_hf_model


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("llama", seed=5)


@pytest.fixture(scope="module")
def unbounded(hf_model):
    """Greedy outputs with a KV pool that never evicts."""
    with make_engine(hf_model, max_total_tokens=8192) as engine:
        return run_all(engine, workload())


def tier_info(engine: Engine) -> dict:
    return engine.get_server_info()["internal_states"][0]["cache"]["tiers"]


@pytest.mark.parametrize("options", [
    {"hicache_write_policy": "write_through"},
    {"hicache_write_policy": "write_back", "radix_eviction_policy": "lfu"},
    {"hicache_write_policy": "write_back", "hicache_ratio": 0.5, "hicache_storage_backend": "file"},
])
def test_tier_moves_keep_greedy_outputs(hf_model, unbounded, options):
    """A pool of 200 tokens for a workload of about 700: run it three times, so prefixes the pool
    dropped come back from the lower tiers; every output equals the unbounded pool's."""
    with make_engine(hf_model, max_total_tokens=200, chunked_prefill_size=32, enable_hierarchical_cache=True,
                     **options) as engine:
        for _ in range(3):
            assert run_all(engine, workload()) == unbounded
        tiers = tier_info(engine)
        assert tiers["hierarchical"] and tiers["load_tokens"] > 0 and tiers["device_evicted_tokens"] > 0
        assert tiers["host_hit_tokens"] + tiers["storage_hit_tokens"] > 0
        if options.get("hicache_storage_backend"):
            assert tiers["storage_write_tokens"] > 0
        assert_drained(engine)


def test_agent_workflow_through_the_engine(hf_model, unbounded):
    """Three agents with long fixed prompts take turns in two workflows on a pool that holds two of
    them; under the workflow policy the next agent's prompt is prefetched, outputs stay exact."""
    agents = {name: [10 + i] * 90 for i, name in enumerate(("plan", "code", "test"))}
    steps = [{"id": "s0", "agents": ["plan"], "next": ["s1"]}, {"id": "s1", "agents": ["code"], "next": ["s2"]},
             {"id": "s2", "agents": ["test"], "next": ["s0"]}]

    def run(engine: Engine) -> list[list[int]]:
        outs = []
        for round_ in range(3):
            for wf in ("w1", "w2"):
                for name, prompt in agents.items():
                    r = engine.generate(input_ids=prompt + [round_ + 1, 7], sampling_params=GREEDY,
                                        workflow_id=wf, agent=name)
                    outs.append(r["output_ids"])
        return outs

    with make_engine(hf_model, max_total_tokens=8192) as engine:
        expected = run(engine)
    with make_engine(hf_model, max_total_tokens=250, enable_hierarchical_cache=True,
                     radix_eviction_policy="workflow") as engine:
        engine.publish_workflow("w1", steps, current_step="s2")
        engine.publish_workflow("w2", steps)
        assert run(engine) == expected
        tiers = tier_info(engine)
        assert tiers["prefetch_started"] > 0 and tiers["workflows"] == 2
        assert tiers["prefetch_hits"] + tiers["prefetch_late"] > 0
        assert tiers["evicted_tokens_workflow"] > 0
        with pytest.raises(InvalidRequestError, match="not a step"):
            engine.publish_workflow("w3", [{"id": "s0", "agents": ["a"], "next": ["s9"]}])
        assert_drained(engine)


def test_abort_cancels_a_load_in_flight(hf_model):
    engine = make_engine(hf_model, enable_hierarchical_cache=True)
    engine.shutdown()  # drive a scheduler by hand, deterministically
    outputs = []
    sched = Scheduler(engine.runner, engine.config.scheduler, on_output=outputs.extend)
    tiered = sched.cache.tiered
    params = SamplingParams(max_new_tokens=1, temperature=0)
    prompt = list(range(1, 80))
    sched.submit(GenerateRequest(rid="warm", input_ids=prompt, sampling_params=params))
    while sched.has_work or not sched.inbox.empty():
        sched.step()
    tiered.evict(10**6)  # the prompt's KV is on the host now
    tiered.loader.gate = threading.Event()  # hold the copy
    sched.submit(GenerateRequest(rid="victim", input_ids=prompt + [5, 6], sampling_params=params))
    sched.step()
    victim = sched.waiting[0]
    assert victim.pending_load is not None and not victim.pending_load.done.is_set()
    sched.check_integrity()
    sched.submit(AbortRequest("victim"))
    sched.step()
    assert victim.pending_load is None and tiered.tier_stats.loads_cancelled == 0  # not applied yet
    tiered.loader.gate.set()
    for _ in range(1000):
        if not sched.cache.loads_pending:
            break
        sched.step()
    assert tiered.tier_stats.loads_cancelled == 1
    assert outputs[-1].rid == "victim" and outputs[-1].finish_reason["type"] == "abort"
    sched.check_integrity()
    assert engine.runner.allocator.num_free_slots + tiered.total_size == engine.runner.kv_pool.num_slots
    assert tiered.match_tiers(prompt).lower_len > 0  # the KV is still there, below the device
    tiered.close()


def test_frontend_fills_in_the_workflow_hints(default_tokenizer, monkeypatch):
    """Programs run inside another program are agents of its workflow; the requests say so."""
    from plait.lang.backend.engine_backend import EngineBackend
    from tests.test_lang_engine import tiny_engine

    seen: list[tuple[str | None, str | None]] = []
    original = Scheduler._add_request

    def recording(self, msg):
        seen.append((msg.workflow_id, msg.agent))
        original(self, msg)

    monkeypatch.setattr(Scheduler, "_add_request", recording)

    @plait.function
    def planner(s, task):
        s += "Plan for " + task + ":" + plait.gen("plan", max_tokens=2)

    @plait.function
    def coder(s, plan):
        s += "Code for " + plan + ":" + plait.gen("code", max_tokens=2)

    @plait.function
    def team(s, task, be):
        for _ in range(2):
            plan = planner.run(task=task, backend=be)
            coder.run(plan=plan["plan"], backend=be).sync()
        s += "done"

    backend = EngineBackend.for_engine(tiny_engine(default_tokenizer))
    team.run(task="x", be=backend, backend=backend).sync()
    hinted = [h for h in seen if h[0] is not None]
    assert [agent for _, agent in hinted] == ["planner", "coder", "planner", "coder"]
    assert len({wf for wf, _ in hinted}) == 1
    planner.run(task="y", backend=backend).sync()
    assert seen[-1] == (None, None)  # a program on its own is no agent
    with plait.workflow("mine") as wid:
        planner.run(task="z", backend=backend).sync()
    assert wid == "mine" and seen[-1] == ("mine", "planner")


# ---- the HTTP server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_tokenizer):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny"), default_tokenizer)
    srv = ServerProcess("--model-path", str(folder), "--dtype", "float32", "--max-total-tokens", "400",
                        "--enable-hierarchical-cache", "--radix-eviction-policy", "workflow", "--enable-metrics",
                        "--served-model-name", "tiny")
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.output


def test_server_workflow_endpoint_hints_and_metrics(server):
    steps = [{"id": "a", "agents": ["alpha"], "next": ["b"]}, {"id": "b", "agents": ["beta"], "next": ["a"]}]
    status, body = post(server.url + "/workflow", {"workflow_id": "wf", "steps": steps, "current_step": "a"})
    assert status == 200 and body["steps"] == 2
    status, body = post(server.url + "/workflow", {"workflow_id": "wf", "steps": [{"id": "a", "next": ["zz"]}]})
    assert status == 400 and "zz" in json.dumps(body)
    alpha, beta = "You are alpha. " * 40, "You are beta. " * 40
    for round_ in range(3):
        status, out = post(server.url + "/generate", {"text": alpha + str(round_), "workflow_id": "wf",
                                                      "agent": "alpha", "sampling_params": GREEDY})
        assert status == 200, out
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": beta},
                                                                    {"role": "user", "content": str(round_)}],
                                              max_tokens=4, extra_body={"workflow_id": "wf", "agent": "beta"})
        assert chat.choices[0].message.content is not None
    status, raw = server.get("/get_server_info")
    tiers = json.loads(raw)["internal_states"][0]["cache"]["tiers"]
    assert tiers["eviction_policy"] == "workflow" and tiers["workflows"] == 1
    assert json.loads(raw)["internal_states"][0]["debug"]["integrity"]["ok"]
    deadline = time.monotonic() + 10  # the counters reach /metrics with the scheduler's periodic stats
    while time.monotonic() < deadline:
        text = server.get("/metrics")[1].decode()
        if "plait:hicache_backup_tokens_total" in text:
            break
        time.sleep(0.2)
    assert "plait:hicache_backup_tokens_total" in text and "plait:hicache_prefetch_hits_total" in text
