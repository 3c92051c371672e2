"""Offline throughput: a whole dataset submitted at once (SGLang's bench_offline_throughput).

    python -m plait.bench.offline_throughput --dataset-name generated-shared-prefix \\
        --gsp-num-groups 8 --gsp-prompts-per-group 16 --gsp-system-prompt-len 1024 \\
        --gsp-question-len 64 --gsp-output-len 32 [--disable-radix-cache] [--schedule-policy fcfs]

The plait backend runs an in-process `plait.Engine` (every field of the runtime config is a
flag: --max-running-requests, --chunked-prefill-size, --max-total-tokens, --dtype, ...) and
sends all requests in one `generate` call. `--backend openai --base-url URL` sends the same
requests to an OpenAI-compatible `/v1/completions` server instead (vLLM, llama-server, ours),
at most `--max-concurrency` at a time. Decoding is greedy with `ignore_eos`, so output lengths
are exact and every engine does the same work.

Prints request, input, output and total token throughput, the duration and the prefix-cache hit
rate of the measured run (cached prompt tokens / prompt tokens); appends a JSON line to
`--result-file`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple
from urllib.parse import urlparse

from plait.bench.datasets import (
    BenchRequest,
    add_dataset_args,
    dataset_from_args,
    dataset_params,
    summarize,
    text_token_ids,
)
from plait.bench.one_batch import add_config_args, config_options, environment, model_choices, write_result
from plait.runtime.config import RuntimeConfig


class RunResult(NamedTuple):
    duration_s: float
    input_tokens: int  # as counted by the engine
    output_tokens: int
    cached_tokens: int | None  # prompt tokens served from the prefix cache; None if unknown
    num_wrong_output_len: int  # requests whose output length differs from the asked one
    info: dict[str, Any]  # backend-specific extras for the record


# ---- the plait backend ----------------------------------------------------------------------------
def greedy_params(output_len: int) -> dict[str, Any]:
    return {"max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}


def run_plait(engine: Any, requests: Sequence[BenchRequest]) -> RunResult:
    """All requests in one `generate` call; the hit rate is the delta of the engine's counters."""
    before = _counters(engine.get_server_info())
    start = time.perf_counter()
    outs = engine.generate(input_ids=[r.prompt_ids for r in requests],
                           sampling_params=[greedy_params(r.output_len) for r in requests])
    duration = time.perf_counter() - start
    info_after = engine.get_server_info()
    after = _counters(info_after)
    metas = [o["meta_info"] for o in outs]
    wrong = sum(m["completion_tokens"] != r.output_len for m, r in zip(metas, requests))
    keys = ("schedule_policy", "prefix_cache", "max_running_requests", "dtype", "device")
    info: dict[str, Any] = {k: info_after.get(k) for k in keys}
    info["max_total_tokens"] = info_after["max_total_num_tokens"]
    info.update({k: after[k] - before.get(k, 0) for k in ("steps", "extend_steps", "decode_steps", "retractions",
                                                          "evicted_tokens")})
    info["meta_cached_tokens"] = sum(m.get("cached_tokens", 0) for m in metas)
    info["memory"] = engine.runner.memory_report._asdict()
    return RunResult(
        duration_s=duration,
        input_tokens=sum(m["prompt_tokens"] for m in metas),
        output_tokens=sum(m["completion_tokens"] for m in metas),
        cached_tokens=after["cached_tokens_total"] - before["cached_tokens_total"],
        num_wrong_output_len=wrong,
        info={**info, "server_prompt_tokens": after["prompt_tokens_total"] - before["prompt_tokens_total"]},
    )


def _counters(server_info: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's step counters and the cache's token counters, from the server info."""
    state = server_info["internal_states"][0]
    return {**state["scheduler"], **state["cache"]}


def warm_up_plait(engine: Any, token_ids: Sequence[int], num_requests: int) -> None:
    """SGLang's warm-up (random 256-token prompts, 16 out), then an empty cache for the real run."""
    rng = random.Random(12345)
    prompts = [rng.choices(token_ids, k=256) for _ in range(num_requests)]
    engine.generate(input_ids=prompts, sampling_params=[greedy_params(16)] * num_requests)
    if not engine.flush_cache():
        raise RuntimeError("could not flush the prefix cache after the warm-up")


# ---- the OpenAI-compatible backend -------------------------------------------------------------------
class OpenAIClient:
    """Blocking `/v1/completions` calls over one HTTP connection per call (stdlib only)."""

    def __init__(self, base_url: str, model: str | None, *, ignore_eos: bool, extra_body: dict[str, Any]):
        url = urlparse(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.prefix = url.path.rstrip("/")
        self.ignore_eos = ignore_eos
        self.extra_body = extra_body
        self.model = model or self._first_model()

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        try:
            payload = json.dumps(body) if body is not None else None
            conn.request(method, self.prefix + path, payload, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _first_model(self) -> str:
        status, data = self._request("GET", "/v1/models")
        if status != 200:
            raise RuntimeError(f"GET /v1/models: HTTP {status}: {data[:300]!r}")
        return json.loads(data)["data"][0]["id"]

    def complete(self, prompt: list[int] | str, output_len: int) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0}
        if self.ignore_eos:
            body.update(ignore_eos=True, min_tokens=output_len)
        body.update(self.extra_body)
        status, data = self._request("POST", "/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"POST /v1/completions: HTTP {status}: {data[:500]!r}")
        return json.loads(data)

    def prefix_cache_counters(self) -> dict[str, float]:
        """vLLM's Prometheus counters of prefix-cache queries and hits (in tokens), if served."""
        try:
            status, data = self._request("GET", "/metrics")
        except OSError:
            return {}
        if status != 200:
            return {}
        counters: dict[str, float] = {}
        for line in data.decode(errors="replace").splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
                counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
        return counters


def run_openai(client: OpenAIClient, prompts: Sequence[list[int] | str], requests: Sequence[BenchRequest],
               max_concurrency: int) -> RunResult:
    counters_before = client.prefix_cache_counters()
    latencies: list[float] = [0.0] * len(requests)
    lock = threading.Lock()

    def one(i: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = client.complete(prompts[i], requests[i].output_len)
        with lock:
            latencies[i] = time.perf_counter() - t0
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        outs = list(pool.map(one, range(len(requests))))
    duration = time.perf_counter() - start
    counters_after = client.prefix_cache_counters()

    usages = [o.get("usage") or {} for o in outs]
    output_tokens = sum(u.get("completion_tokens", 0) for u in usages)
    wrong = sum(u.get("completion_tokens") != r.output_len for u, r in zip(usages, requests))
    details = [(u.get("prompt_tokens_details") or {}).get("cached_tokens") for u in usages]
    cached: int | None = None
    source = None
    if any(d is not None for d in details):
        cached, source = sum(d or 0 for d in details), "usage.prompt_tokens_details"
    elif "vllm:prefix_cache_queries_total" in counters_after:
        cached, source = int(counters_after.get("vllm:prefix_cache_hits_total", 0)
                             - counters_before.get("vllm:prefix_cache_hits_total", 0)), "vllm /metrics"
        queries = counters_after["vllm:prefix_cache_queries_total"] - counters_before.get(
            "vllm:prefix_cache_queries_total", 0)
    info = {"model": client.model, "max_concurrency": max_concurrency, "cache_counter_source": source,
            "mean_latency_s": sum(latencies) / len(latencies), "max_latency_s": max(latencies)}
    if source == "vllm /metrics":
        info["vllm_prefix_cache_queries"] = queries
    return RunResult(duration, sum(u.get("prompt_tokens", 0) for u in usages), output_tokens, cached, wrong, info)


# ---- the program -------------------------------------------------------------------------------------
def engine_choices() -> dict[str, Sequence[str]]:
    from plait.runtime.scheduler.policy import SCHEDULE_POLICIES

    return {**model_choices(), "schedule_policy": tuple(SCHEDULE_POLICIES), "prefix_cache": ("radix", "flat", "none")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("plait", "openai"), default="plait")
    parser.add_argument("--base-url", default="http://127.0.0.1:8011", help="openai: the server")
    parser.add_argument("--model", default=None, help="openai: served model name (default: the first listed)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="openai: requests in flight (default: all)")
    parser.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                        help="openai: send token ids, or their decoded text (the server re-tokenizes)")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="openai: do not send ignore_eos/min_tokens (for servers that reject them)")
    parser.add_argument("--extra-request-body", default="{}", help="openai: JSON merged into every request")
    parser.add_argument("--warmup-requests", type=int, default=16, help="unmeasured warm-up requests (0: none)")
    parser.add_argument("--result-file", default=None)
    parser.add_argument("--run-name", default="")
    add_dataset_args(parser)
    # The engine's own options; for the openai backend --model-path only names the tokenizer whose
    # vocabulary the prompts are drawn from (default: the default model's).
    add_config_args(parser, *RuntimeConfig.sections().values(), choices=engine_choices())
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options = config_options(args, *RuntimeConfig.sections().values())
    engine = client = None
    if args.backend == "plait":
        from plait.runtime.engine import Engine

        load_start = time.perf_counter()
        engine = Engine(**options)
        print(f"engine ready in {time.perf_counter() - load_start:.1f} s: {engine.runner.source.path}, "
              f"{engine.runner.dtype}, KV pool {engine.runner.kv_pool.num_slots} tokens", flush=True)
        print(f"memory: {engine.runner.memory_report}", flush=True)
        tokenizer, vocab_size = engine.tokenizer, engine.runner.vocab_size
    else:
        from plait.runtime.model_loader import resolve_model

        source = resolve_model(options.get("model_path"), load_format=options.get("load_format", "auto"),
                               tokenizer_path=options.get("tokenizer_path"))
        tokenizer, vocab_size = source.tokenizer, source.config["vocab_size"]
        client = OpenAIClient(args.base_url, args.model, ignore_eos=not args.no_ignore_eos,
                              extra_body=json.loads(args.extra_request_body))
    token_ids = text_token_ids(tokenizer, vocab_size)
    requests = dataset_from_args(args, token_ids)
    summary = summarize(requests)
    print(f"dataset {args.dataset_name}: {summary.num_requests} requests, {summary.input_tokens} input tokens, "
          f"{summary.output_tokens} output tokens, ideal prefix-cache hit rate {summary.ideal_hit_rate:.3f}", flush=True)

    try:
        if engine is not None:
            if args.warmup_requests:
                warm_up_plait(engine, token_ids, args.warmup_requests)
            result = run_plait(engine, requests)
        else:
            prompts: list[Any] = [r.prompt_ids for r in requests]
            if args.prompt_format == "text":
                assert tokenizer is not None, "--prompt-format text needs a tokenizer"
                prompts = [tokenizer.hf.decode(p) for p in prompts]
            if args.warmup_requests:
                rng = random.Random(12345)
                for _ in range(min(args.warmup_requests, 2)):
                    client.complete(rng.choices(token_ids, k=16), 4)
            result = run_openai(client, prompts, requests, args.max_concurrency or len(requests))
    finally:
        if engine is not None:
            engine.shutdown()

    record = make_record(args, options, summary, result)
    print_summary(record)
    write_result(args.result_file, record)
    return record


def make_record(args: argparse.Namespace, options: dict[str, Any], summary: Any, r: RunResult) -> dict[str, Any]:
    d = r.duration_s
    hit_rate = r.cached_tokens / r.input_tokens if r.cached_tokens is not None and r.input_tokens else None
    return {
        "bench": "offline_throughput", "backend": args.backend, "run_name": args.run_name,
        **dataset_params(args), "engine_options": options,
        "num_requests": summary.num_requests, "duration_s": d,
        "total_input_tokens": r.input_tokens, "total_output_tokens": r.output_tokens,
        "request_throughput": summary.num_requests / d,
        "input_throughput": r.input_tokens / d, "output_throughput": r.output_tokens / d,
        "total_throughput": (r.input_tokens + r.output_tokens) / d,
        "cache_hit_rate": hit_rate, "cached_tokens": r.cached_tokens, "ideal_hit_rate": summary.ideal_hit_rate,
        "num_wrong_output_len": r.num_wrong_output_len, "info": r.info, "env": environment(),
    }


def print_summary(r: dict[str, Any]) -> None:
    hit = "n/a" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.3f}"
    rows = [
        ("Backend", f"{r['backend']} {r['run_name']}".strip()),
        ("Successful requests", r["num_requests"]),
        ("Benchmark duration (s)", f"{r['duration_s']:.2f}"),
        ("Total input tokens", r["total_input_tokens"]),
        ("Total generated tokens", r["total_output_tokens"]),
        ("Request throughput (req/s)", f"{r['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{r['input_throughput']:.1f}"),
        ("Output token throughput (tok/s)", f"{r['output_throughput']:.1f}"),
        ("Total token throughput (tok/s)", f"{r['total_throughput']:.1f}"),
        ("Cache hit rate", hit),
        ("Ideal hit rate (dataset)", f"{r['ideal_hit_rate']:.3f}"),
    ]
    if r["num_wrong_output_len"]:
        rows.append(("Requests with a wrong output length", r["num_wrong_output_len"]))
    print("\n{s:=^50}".format(s=" Offline Throughput Benchmark Result "))
    for name, value in rows:
        print(f"{name + ':':<40} {value}")
    print("=" * 50, flush=True)


if __name__ == "__main__":
    main()
