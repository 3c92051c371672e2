"""Smoke tests of the benchmark programs on tiny models: they run and write the fields we report.

No timing is asserted here; the figures come from running the programs (docs/performance-cpu.md).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from plait.bench import ceilings, datasets, hf_baseline, offline_throughput, one_batch

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}
ONE_BATCH_FIELDS = {
    "bench", "engine", "dtype", "batch_size", "input_len", "output_len", "prefill_latency_s",
    "prefill_throughput_tok_s", "median_decode_latency_s", "median_decode_throughput_tok_s", "decode_steps",
    "total_latency_s", "overall_throughput_tok_s", "env",
}
OFFLINE_FIELDS = {
    "bench", "backend", "dataset_name", "num_requests", "duration_s", "total_input_tokens", "total_output_tokens",
    "request_throughput", "input_throughput", "output_throughput", "total_throughput", "cache_hit_rate",
    "ideal_hit_rate", "num_wrong_output_len", "env",
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- datasets -------------------------------------------------------------------------------------
def test_text_token_ids_skip_special_and_added_tokens():
    class FakeHF:
        all_special_ids: ClassVar = [0, 1, 2]
        added_tokens_decoder: ClassVar = {0: "<s>", 1: "</s>", 2: "<pad>", 3: "<|im_start|>"}

        def __len__(self):
            return 10

    assert datasets.text_token_ids(FakeHF(), 10) == [4, 5, 6, 7, 8, 9]
    assert datasets.text_token_ids(None, 5) == [0, 1, 2, 3, 4]


def test_generated_shared_prefix_shape_and_ideal_hit_rate():
    g, p, s, q = 3, 4, 20, 5
    reqs = datasets.generated_shared_prefix(range(100, 200), num_groups=g, prompts_per_group=p,
                                            system_prompt_len=s, question_len=q, output_len=7, seed=1)
    assert len(reqs) == g * p and all(len(r.prompt_ids) == s + q and r.output_len == 7 for r in reqs)
    for group in range(g):
        prefixes = {tuple(r.prompt_ids[:s]) for r in reqs if r.group == group}
        assert len(prefixes) == 1
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # shuffled across groups
    summary = datasets.summarize(reqs)
    # Random questions may share a first token or two with a sibling's; the prefix dominates.
    assert summary.ideal_hit_rate == pytest.approx(g * (p - 1) * s / (g * p * (s + q)), abs=0.02)
    assert datasets.generated_shared_prefix(range(100, 200), num_groups=g, prompts_per_group=p, system_prompt_len=s,
                                            question_len=q, output_len=7, seed=1) == reqs


def test_random_dataset_lengths_follow_range_ratio():
    reqs = datasets.random_dataset(range(50), num_prompts=50, input_len=40, output_len=10, range_ratio=0.5, seed=0)
    assert all(20 <= len(r.prompt_ids) <= 40 and 5 <= r.output_len <= 10 for r in reqs)
    exact = datasets.random_dataset(range(50), num_prompts=5, input_len=40, output_len=10, seed=0)
    assert {len(r.prompt_ids) for r in exact} == {40} and {r.output_len for r in exact} == {10}


def test_config_flags_pass_only_what_was_given():
    parser = offline_throughput.build_parser()
    args = parser.parse_args(["--disable-radix-cache", "--schedule-policy", "fcfs", "--max-total-tokens", "4096"])
    opts = one_batch.config_options(args, *offline_throughput.RuntimeConfig.sections().values())
    assert opts == {"disable_radix_cache": True, "schedule_policy": "fcfs", "max_total_tokens": 4096}
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule-policy", "no-such-policy"])


# ---- the programs ---------------------------------------------------------------------------------
def test_one_batch_writes_json(tiny_config, tmp_path):
    out = tmp_path / "one_batch.jsonl"
    one_batch.main(["--model-path", tiny_config, "--load-format", "dummy", "--dtype", "float32",
                    "--batch-size", "1", "3", "--input-len", "16", "--output-len", "5", "--warmup", "2",
                    "--profile-steps", "2", "--result-file", str(out)])
    lines = read_lines(out)
    assert [r["batch_size"] for r in lines] == [1, 3]
    for r in lines:
        assert ONE_BATCH_FIELDS <= r.keys()
        assert r["engine"] == "plait" and r["dtype"] == "float32" and r["decode_steps"] == 4
        assert r["prefill_latency_s"] > 0 and r["median_decode_latency_s"] > 0


def test_ceilings_measure_and_round_trip(tmp_path):
    out = tmp_path / "ceilings.json"
    measured = ceilings.main(["--device", "cpu", "--copy-mib", "8", "--matmul-n", "128", "--repeats", "3",
                              "--output", str(out)])
    assert measured.copy_bytes_per_s > 0 and measured.matmul_flop_per_s > 0 and measured.device == "cpu"
    assert ceilings.load(str(out)) == measured


def test_one_batch_against_ceilings_and_baseline(tiny_config, tmp_path):
    """Fractions of made-up ceilings and ratios to a made-up baseline, from the tiny model's shapes."""
    ceil = tmp_path / "ceilings.json"
    ceil.write_text(json.dumps(ceilings.Ceilings(copy_bytes_per_s=1e9, matmul_flop_per_s=1e12, device="x",
                                                 copy_bytes=1, matmul_n=1, matmul_dtype="bfloat16").to_json()))
    base = tmp_path / "hf.jsonl"
    base.write_text(json.dumps({"batch_size": 2, "input_len": 16, "output_len": 4, "median_decode_latency_s": 1.0,
                                "prefill_latency_s": 2.0}) + "\n")
    out = tmp_path / "one_batch.jsonl"
    one_batch.main(["--model-path", tiny_config, "--load-format", "dummy", "--dtype", "float32", "--shapes", "2x16x4",
                    "1x8x3", "--prefill-chunk-tokens", "16", "--warmup", "1", "--ceilings", str(ceil),
                    "--baseline", str(base), "--result-file", str(out)])
    first, second = read_lines(out)
    assert (second["batch_size"], second["input_len"], second["output_len"]) == (1, 8, 3)
    assert first["vs_hf"]["decode_speedup_vs_hf"] == pytest.approx(1.0 / first["median_decode_latency_s"])
    assert first["vs_hf"]["prefill_speedup_vs_hf"] == pytest.approx(2.0 / first["prefill_latency_s"])
    assert second["vs_hf"] is None
    # The tiny model (tied embeddings, float32): 20480 embedding + 2 x 36992 layer + 64 norm parameters;
    # a decode step reads all of them once plus 2 requests x (16 + 4/2) tokens x 512 KV bytes.
    c = first["ceilings"]
    assert c["decode_bytes_per_step"] == 4 * 94528 + 2 * 18 * 512
    assert c["decode_floor_s"] == pytest.approx(c["decode_bytes_per_step"] / 1e9)
    assert c["decode_fraction_of_floor"] == pytest.approx(c["decode_floor_s"] / first["median_decode_latency_s"])
    # Prefill: 2 x body params x tokens + the LM head at the last token + causal attention (2 L H d n^2).
    assert c["prefill_flops"] == 2 * (2 * 74048 * 16 + 2 * 320 * 64 + 2 * 2 * 4 * 16 * 16**2)
    assert c["prefill_fraction_of_matmul"] == pytest.approx(c["prefill_flops"] / first["prefill_latency_s"] / 1e12)
    assert first["decode_graph_replay_s"] is None and first["cuda_graphs"] is False


def test_hf_baseline_dummy_preset_config(tiny_config, tmp_path):
    out = tmp_path / "hf.jsonl"
    hf_baseline.main(["--model-path", tiny_config, "--load-format", "dummy", "--dtype", "float32", "--shapes", "1x6x3",
                      "--warmup", "0", "--result-file", str(out)])
    (r,) = read_lines(out)
    assert r["load_format"] == "dummy" and r["device"] == "cpu" and r["decode_steps"] == 2


def test_hf_baseline_writes_json(tmp_path):
    from tests.tiny_models import tiny_hf_model

    folder = tmp_path / "hf"
    tiny_hf_model("llama").save_pretrained(folder)
    out = tmp_path / "hf.jsonl"
    hf_baseline.main(["--model-path", str(folder), "--dtype", "float32", "--batch-size", "2", "--input-len", "12",
                      "--output-len", "4", "--warmup", "1", "--result-file", str(out)])
    (r,) = read_lines(out)
    assert ONE_BATCH_FIELDS <= r.keys()
    assert r["engine"] == "hf" and r["batch_size"] == 2 and r["decode_steps"] == 3 and "transformers" in r["env"]


@pytest.mark.parametrize("extra", [[], ["--disable-radix-cache", "--schedule-policy", "fcfs"]])
def test_offline_throughput_shared_prefix(tiny_config, tmp_path, extra):
    out = tmp_path / "offline.jsonl"
    offline_throughput.main([
        "--model-path", tiny_config, "--load-format", "dummy", "--dtype", "float32", "--max-total-tokens", "4096",
        "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2", "--gsp-prompts-per-group", "3",
        "--gsp-system-prompt-len", "48", "--gsp-question-len", "8", "--gsp-output-len", "4",
        "--warmup-requests", "2", "--result-file", str(out), *extra,
    ])
    (r,) = read_lines(out)
    assert OFFLINE_FIELDS <= r.keys()
    assert r["num_requests"] == 6 and r["total_input_tokens"] == 6 * 56 and r["total_output_tokens"] == 6 * 4
    assert r["num_wrong_output_len"] == 0
    if extra:
        assert r["cache_hit_rate"] == 0 and r["info"]["schedule_policy"] == "fcfs"
    else:
        assert r["cache_hit_rate"] > 0.5  # the warm-up's requests were flushed, the groups' prefixes hit


def test_offline_throughput_random(tiny_config, tmp_path):
    out = tmp_path / "random.jsonl"
    offline_throughput.main([
        "--model-path", tiny_config, "--load-format", "dummy", "--max-total-tokens", "4096", "--num-prompts", "5",
        "--random-input-len", "20", "--random-output-len", "6", "--random-range-ratio", "0.5",
        "--warmup-requests", "0", "--result-file", str(out),
    ])
    (r,) = read_lines(out)
    assert r["dataset_name"] == "random" and r["num_requests"] == 5 and r["num_wrong_output_len"] == 0


class _FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models, /v1/completions (echoing exact usage) and vLLM-style prefix-cache counters."""

    bodies: ClassVar[list[dict]] = []
    hits = 0

    def _send(self, obj, content_type="application/json"):
        data = obj.encode() if isinstance(obj, str) else json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send({"data": [{"id": "fake"}]})
        else:
            cls = type(self)
            self._send(f"vllm:prefix_cache_queries_total{{model_name=\"fake\"}} {10 * len(cls.bodies)}.0\n"
                       f"vllm:prefix_cache_hits_total{{model_name=\"fake\"}} {cls.hits}.0\n", "text/plain")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        type(self).hits += 5
        n = len(body["prompt"])
        self._send({"choices": [{"text": "x"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": body["max_tokens"]}})

    def log_message(self, *args):
        pass


def test_offline_throughput_openai_backend(tiny_config, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "openai.jsonl"
        offline_throughput.main([
            "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.server_port}", "--max-concurrency", "2",
            "--model-path", tiny_config, "--load-format", "dummy", "--num-prompts", "4", "--random-input-len", "10",
            "--random-output-len", "3", "--warmup-requests", "1", "--result-file", str(out),
        ])
    finally:
        server.shutdown()
        thread.join()
    (r,) = read_lines(out)
    assert OFFLINE_FIELDS <= r.keys()
    assert r["backend"] == "openai" and r["total_input_tokens"] == 40 and r["total_output_tokens"] == 12
    assert r["info"]["model"] == "fake" and r["info"]["cache_counter_source"] == "vllm /metrics"
    assert r["cached_tokens"] == 20  # 4 measured requests x 5 hits, the warm-up's excluded
    sent = _FakeOpenAI.bodies[-1]
    assert sent["temperature"] == 0.0 and sent["ignore_eos"] is True and sent["min_tokens"] == sent["max_tokens"] == 3


class _FakeStreamingOpenAI(BaseHTTPRequestHandler):
    """/v1/completions streaming `max_tokens` one-token events, 2 ms apart."""

    prompt_lens: ClassVar[list[int]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).prompt_lens.append(len(body["prompt"]))
        assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0.0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            self.wfile.write(b'data: {"choices": [{"text": "x"}]}\n\n')
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


def test_decode_context_times_each_length(tmp_path):
    from plait.bench import decode_context

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeStreamingOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = tmp_path / "context.jsonl"
        decode_context.main(["--base-url", f"http://127.0.0.1:{server.server_port}", "--contexts", "16", "64",
                             "--new-tokens", "5", "--reps", "2", "--output-file", str(out)])
    finally:
        server.shutdown()
        thread.join()
    (r,) = read_lines(out)
    assert [row["context"] for row in r["rows"]] == [16, 64]
    assert _FakeStreamingOpenAI.prompt_lens[-4:] == [16, 16, 64, 64]  # exact prompt lengths, after a warm-up
    for row in r["rows"]:
        # 4 gaps of >= 10 ms between the 5 tokens; the first two may arrive together (3 gaps seen)
        assert row["tokens"] == 5 and 5 < row["decode_tok_s"] < 4 / 0.03
    assert r["rows"][0]["vs_shortest"] == 1.0


class _FakeSlowPrefill(_FakeStreamingOpenAI):
    """As _FakeStreamingOpenAI, with 60 ms before the first token (a slower prefill)."""

    prompt_lens: ClassVar[list[int]] = []

    def do_POST(self):
        time.sleep(0.06)
        super().do_POST()


def test_alternate_times_servers_in_turn(tmp_path):
    from plait.bench import alternate

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (_FakeStreamingOpenAI, _FakeSlowPrefill)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    before, before_slow = len(_FakeStreamingOpenAI.prompt_lens), len(_FakeSlowPrefill.prompt_lens)
    try:
        out = tmp_path / "alternate.jsonl"
        alternate.main(["--server", f"fast=http://127.0.0.1:{servers[0].server_port}",
                        "--server", f"slow=http://127.0.0.1:{servers[1].server_port}",
                        "--prompt-len", "24", "--new-tokens", "3", "--rounds", "4", "--output-file", str(out)])
    finally:
        for s in servers:
            s.shutdown()
        for t in threads:
            t.join()
    (r,) = read_lines(out)
    fast, slow = r["rows"]
    assert (fast["server"], slow["server"]) == ("fast", "slow")
    # each server: a 16-token warm-up, then one exact 24-token prompt a round
    assert _FakeStreamingOpenAI.prompt_lens[before:] == [16, 24, 24, 24, 24]
    assert _FakeSlowPrefill.prompt_lens[before_slow:] == [16, 24, 24, 24, 24]
    assert slow["fast_prefill_ratio"] > 2 and slow["fast_prefill_ratio_range"][0] > 1.5  # 60 ms more to first token
    assert 0.3 < slow["fast_decode_ratio"] < 3  # the same token spacing
    low, high = slow["fast_decode_ratio_range"]
    assert low <= slow["fast_decode_ratio"] <= high
    assert fast["decode_tok_s_range"][0] <= fast["decode_tok_s"] <= fast["decode_tok_s_range"][1]
    with pytest.raises(SystemExit):
        alternate.main(["--server", "only=http://127.0.0.1:1"])


def test_workflow_bench_runs_every_setup(tiny_config, tmp_path):
    from plait.bench import workflow

    out = tmp_path / "workflow.json"
    workflow.main([
        "--model-path", tiny_config, "--num-agents", "3", "--prompt-len", "64", "--task-len", "4",
        "--output-len", "2", "--rounds", "2", "--workflows", "1,2", "--chat-sessions", "2", "--chat-turns", "2",
        "--chat-system-len", "32", "--chat-turn-len", "16", "--chat-pool", "96", "--output-file", str(out),
        "--", "--load-format", "dummy", "--dtype", "float32",
    ])
    result = json.loads(out.read_text())
    assert result["environment"]["cpu"]
    agents = result["agents"]
    assert [(r["workflows"], r["mode"]) for r in agents] == [(1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c")]
    assert all(r["integrity_ok"] and r["requests"] == r["workflows"] * 2 * 3 for r in agents)
    assert all("speedup_vs_a" in r and "speedup_vs_b" in r for r in agents if r["mode"] == "c")
    assert any(r["host_hit_tokens"] > 0 for r in agents if r["mode"] == "b")  # the pool cannot hold all agents
    assert any(r["prefetch_started"] > 0 for r in agents if r["mode"] == "c")
    assert [r["mode"] for r in result["chat"]] == ["a", "b"] and "speedup_vs_a" in result["chat"][1]


def test_workflow_bench_with_private_agents(tiny_config, tmp_path):
    from plait.bench import workflow

    out = tmp_path / "workflow.json"
    workflow.main([
        "--model-path", tiny_config, "--num-agents", "3", "--prompt-len", "64", "--task-len", "4",
        "--output-len", "2", "--rounds", "2", "--workflows", "2", "--private-agents", "--modes", "a,c",
        "--skip-chat", "--output-file", str(out), "--", "--load-format", "dummy", "--dtype", "float32",
    ])
    agents = json.loads(out.read_text())["agents"]
    assert [r["mode"] for r in agents] == ["a", "c"]
    assert all(r["integrity_ok"] and r["requests"] == 2 * 2 * 3 for r in agents)
    # two workflows x three agents of their own: a pool of 3.5 agents' steps holds fewer than the 6
    # prompts, so LRU alone finds (almost) nothing; the tiers find the second round's prompts
    assert agents[0]["hit_rate"] < 0.2 and agents[1]["hit_rate"] > agents[0]["hit_rate"]


def test_workflow_bench_with_a_storage_tier(tiny_config, tmp_path):
    """--storage-dir: the hierarchical engines get a file tier of their own under it; a host tier too small
    for the private agents' prompts (1.2 x the KV pool) sends what it evicts there."""
    from plait.bench import workflow

    out, store = tmp_path / "workflow.json", tmp_path / "store"
    store.mkdir()
    workflow.main([
        "--model-path", tiny_config, "--num-agents", "3", "--prompt-len", "64", "--task-len", "4",
        "--output-len", "2", "--rounds", "2", "--workflows", "2", "--private-agents", "--modes", "a,c",
        "--skip-chat", "--hicache-ratio", "1.2", "--storage-dir", str(store), "--output-file", str(out),
        "--", "--load-format", "dummy", "--dtype", "float32",
    ])
    agents = {r["mode"]: r for r in json.loads(out.read_text())["agents"]}
    assert all(r["integrity_ok"] for r in agents.values())
    assert agents["a"]["storage_write_tokens"] == 0  # no hierarchical cache, no tier
    assert agents["c"]["storage_write_tokens"] > 0
    folders = [p for p in store.iterdir() if p.is_dir()]
    assert [p.name.startswith("workflow-c-") for p in folders] == [True]
    assert any(f.is_file() and f.stat().st_size > 0 for f in folders[0].rglob("*"))


def test_cpu_kernels_bench_times_every_path_it_can_run():
    """plait.bench.cpu_kernels: a row per product and per context, with the AMX columns only where AMX runs."""
    from plait.bench import cpu_kernels
    from plait.runtime.cpu import kernels

    if not kernels.available():
        pytest.skip("CPU kernels not built here")
    products = cpu_kernels.product_rows(rows=9, repeats=1)
    assert [r["product"] for r in products] == list(cpu_kernels.PRODUCTS)
    attention = cpu_kernels.attention_rows(chunk=16, contexts=[32, 80], repeats=1)
    assert [r["keys"] for r in attention] == [32, 80]
    for row in products + attention:
        assert all(v > 0 for k, v in row.items() if k.endswith("_ms"))
        assert ("amx_ms" in row) == kernels.amx_available() and ("amx_bf16_ms" in row) == kernels.amx_available()


def test_rounding_bench_rounds_as_its_variants_say():
    """The rounding variants of `plait.bench.rounding`: b-bit integers per block of 32 (error at most
    half a step of the block's scale, the block's largest value kept), and x's two bfloat16 parts
    (16 significant bits, far closer than bfloat16 alone)."""
    import torch

    from plait.bench import rounding

    torch.manual_seed(0)
    x = torch.randn(3, 96) * torch.linspace(0.01, 5, 96)
    for bits in (16, 12, 8):
        step = x.view(3, 3, 32).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        err = (rounding.round_blocks(x, bits) - x).view(3, 3, 32).abs()
        assert torch.all(err <= step / 2 * (1 + 1e-5))
        assert torch.all(err.amax(-1, keepdim=True) > step / 8)  # it does round
    parts = (rounding.two_bf16_parts(x) - x).abs() / x.abs()
    assert parts.max() < 2**-16 and (rounding.bf16(x) - x).abs().div(x.abs()).max() > 2**-10


def test_rounding_bench_integer_attention_is_causal_attention_rounded():
    """`plait.bench.rounding.integer_attention`: without integer rounding it is causal attention over
    float16 keys and values (prefill and one decode row, grouped heads); with q, k at 13 bits and p, v at
    14 it rounds, within the steps' size, and coarser bits round more."""
    import types

    import torch

    from plait.bench import rounding

    torch.manual_seed(0)
    q = torch.randn(1, 6, 40, 64)
    k, v = torch.randn(1, 2, 40, 64).half().float(), torch.randn(1, 2, 40, 64).half().float()
    module = types.SimpleNamespace(num_key_value_groups=3)
    kk, vv = k.repeat_interleave(3, dim=1).double(), v.repeat_interleave(3, dim=1).double()
    scores = (q.double() @ kk.transpose(2, 3)) * 0.125
    scores = scores.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    exact = (torch.softmax(scores, -1) @ vv).transpose(1, 2).float()

    def err(bits_qk, bits_pv, rows=slice(None)):
        out, _ = rounding.integer_attention(bits_qk, bits_pv)(module, q[:, :, rows], k, v, None, scaling=0.125)
        assert out.shape == exact[:, rows].shape
        return float((out - exact[:, rows]).norm() / exact[:, rows].norm())

    assert err(None, None) < 1e-6 and err(None, None, slice(39, 40)) < 1e-6
    fine, coarse = err(13, 14), err(12, 12)
    assert 1e-6 < fine < 2e-3 and fine < coarse < 1e-2
