"""Data parallelism on one machine: cache hit rate and throughput per routing policy, and the
router's own cost per request.

    python -m plait.bench.scale_out --output-file scale_out.json

Runs the generated-shared-prefix workload (many groups, shuffled) against:
  single            one replica with the memory of two (the hit rate a single cache reaches)
  dp2 <policy>      one server with --dp-size 2 (a replica per core), --load-balance-method <policy>
  router <policy>   two independent servers (one core each) behind `plait router --policy <policy>`
and measures the router's overhead: the latency of a 1-token request through the router minus
straight to a worker, and the in-process cost of one cache-aware routing decision on a full tree.
Prints a table and writes every record as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

from plait.bench.datasets import BenchRequest, generated_shared_prefix, summarize, text_token_ids
from plait.bench.serving import Client, run_benchmark, summarize_results

POLICIES = ("cache_aware", "round_robin", "random")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server or router subprocess, optionally pinned to some cores."""

    def __init__(self, args: list[str], *, cores: set[int] | None = None, log: str):
        self.log = open(log, "w")
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=pin, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _wait_healthy(url: str, procs: list[Proc], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"a process exited ({p.proc.returncode}); see {p.log.name}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _server(port: int, memory: int, extra: list[str], *, cores: set[int] | None, log: str) -> Proc:
    return Proc(["plait.launch_server", "--port", str(port), "--max-total-tokens", str(memory),
                 "--log-level", "warning", *extra], cores=cores, log=log)


async def _workload(url: str, requests: list[BenchRequest], tokenizer: Any, concurrency: int) -> dict[str, Any]:
    client = Client("sglang", url, None, "ids", True, {}, None, tokenizer)
    results, duration = await run_benchmark(client, requests, request_rate=float("inf"), max_concurrency=concurrency)
    return summarize_results(results, duration)


def _flush(urls: list[str]) -> None:
    for url in urls:
        urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", data=b"{}", method="POST"), timeout=60)


async def _latency(url: str, prompt: list[int], n: int) -> float:
    """Mean seconds of a 1-token request, `n` in a row."""
    client = Client("sglang", url, None, "ids", True, {}, None, None)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        result = await client.send(BenchRequest(prompt, 1))
        assert result.success, result.error
        times.append(time.perf_counter() - start)
    return statistics.fmean(times[2:])  # the first ones warm the connections' code paths


def _decision_cost(num_prompts: int, prompt_chars: int) -> float:
    """Seconds per cache-aware routing decision over 2 workers, with `num_prompts` prompts in the tree."""
    from plait.router.policy import CacheAware, WorkerLoad

    rng = random.Random(0)
    groups = ["".join(rng.choices("abcdefgh ", k=prompt_chars)) for _ in range(num_prompts // 8)]
    prompts = [g + "".join(rng.choices("abcdefgh ", k=64)) for g in groups for _ in range(8)]
    policy = CacheAware()
    workers = [WorkerLoad("w0", 0), WorkerLoad("w1", 0)]
    for p in prompts:
        policy.select(workers, p)
    start = time.perf_counter()
    for p in prompts:
        policy.select(workers, p)
    return (time.perf_counter() - start) / len(prompts)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from plait.runtime.model_loader import resolve_model

    tokenizer = resolve_model(args.model_path).tokenizer
    requests = generated_shared_prefix(
        text_token_ids(tokenizer, len(tokenizer.hf)), num_groups=args.num_groups,
        prompts_per_group=args.prompts_per_group, system_prompt_len=args.system_prompt_len,
        question_len=args.question_len, output_len=args.output_len, seed=args.seed)
    dataset = summarize(requests)
    model = ["--model-path", args.model_path] if args.model_path else []
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs at least 2 cores")
    one, other = {cores[0]}, {cores[1]}
    records: list[dict[str, Any]] = []
    logs = args.log_dir
    os.makedirs(logs, exist_ok=True)

    def record(setup: str, policy: str | None, result: dict[str, Any], **extra: Any) -> None:
        row = {"setup": setup, "policy": policy, "ideal_hit_rate": dataset.ideal_hit_rate, **result, **extra}
        records.append(row)
        print(f"{setup:<8} {policy or '-':<12} hit rate {row['cache_hit_rate']:.3f}  "
              f"{row['request_throughput']:.2f} req/s  {row['total_throughput']:.0f} tok/s  "
              f"failed {row['failed']}", flush=True)

    # A single replica with both cores and the memory of two: the hit rate one cache reaches.
    port = _free_port()
    single = _server(port, 2 * args.max_total_tokens, model, cores=one | other, log=f"{logs}/single.log")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", [single])
        record("single", None, asyncio.run(_workload(f"http://127.0.0.1:{port}", requests, tokenizer,
                                                      args.max_concurrency)))
    finally:
        single.stop()

    # --dp-size 2: the server pins a replica per core.
    for policy in POLICIES:
        port = _free_port()
        dp = _server(port, args.max_total_tokens, [*model, "--dp-size", "2", "--load-balance-method", policy],
                     cores=None, log=f"{logs}/dp2-{policy}.log")
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, [dp])
            result = asyncio.run(_workload(url, requests, tokenizer, args.max_concurrency))
            info = _get_json(url + "/get_server_info")
            record("dp2", policy, result, dispatched=[r["dispatched"] for r in info["replicas"]])
        finally:
            dp.stop()

    # Two independent servers, one core each, behind the router.
    ports = [_free_port(), _free_port()]
    workers = [_server(p, args.max_total_tokens, model, cores=c, log=f"{logs}/worker{i}.log")
               for i, (p, c) in enumerate(zip(ports, (one, other)))]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url in urls:
            _wait_healthy(url, workers)
        for policy in POLICIES:
            _flush(urls)
            port = _free_port()
            router = Proc(["plait.router", "--port", str(port), "--policy", policy, "--log-level", "warning",
                           "--worker-urls", *urls], log=f"{logs}/router-{policy}.log")
            try:
                url = f"http://127.0.0.1:{port}"
                _wait_healthy(url, [router, *workers])
                while not all(w["healthy"] for w in _get_json(url + "/workers")["workers"]):
                    time.sleep(0.2)
                result = asyncio.run(_workload(url, requests, tokenizer, args.max_concurrency))
                info = _get_json(url + "/get_server_info")
                record("router", policy, result, dispatched=[w["requests_total"] for w in info["workers"]])
                if policy == "round_robin":
                    prompt = requests[0].prompt_ids[:16]
                    direct = asyncio.run(_latency(urls[0], prompt, args.latency_requests))
                    routed = asyncio.run(_latency(url, prompt, args.latency_requests))
                    overhead = {"direct_latency_ms": 1000 * direct, "routed_latency_ms": 1000 * routed,
                                "router_overhead_ms": 1000 * (routed - direct)}
                    records.append({"setup": "router_overhead", **overhead})
                    print(f"router overhead: {1000 * direct:.2f} ms direct, {1000 * routed:.2f} ms routed "
                          f"({1000 * (routed - direct):+.2f} ms)", flush=True)
            finally:
                router.stop()
    finally:
        for w in workers:
            w.stop()
    cost = _decision_cost(1024, 2000)
    records.append({"setup": "decision_cost", "prompts_in_tree": 1024, "prompt_chars": 2064,
                    "seconds_per_decision": cost})
    print(f"cache-aware decision: {1e6 * cost:.1f} us with 1024 prompts of ~2k characters in the tree")
    return records


def print_table(records: list[dict[str, Any]]) -> None:
    print("\n| setup | policy | cache hit rate | requests/s | tokens/s (in+out) | p50 TTFT ms | requests per worker |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        if r["setup"] in ("single", "dp2", "router"):
            print(f"| {r['setup']} | {r['policy'] or '-'} | {r['cache_hit_rate']:.3f} | {r['request_throughput']:.2f} | "
                  f"{r['total_throughput']:.0f} | {r['ttft_ms']['median']:.0f} | {r.get('dispatched', '-')} |")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="default: the default model")
    parser.add_argument("--num-groups", type=int, default=24)
    parser.add_argument("--prompts-per-group", type=int, default=6)
    parser.add_argument("--system-prompt-len", type=int, default=384)
    parser.add_argument("--question-len", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--max-total-tokens", type=int, default=6144, help="KV pool of each replica (the single "
                        "replica gets twice this)")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="/tmp/plait-scale-out-logs")
    parser.add_argument("--output-file", default=None, help="write the records here as JSON")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    records = run(args)
    print_table(records)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"bench": "scale_out", "date": started, "machine": platform.processor() or platform.machine(),
                       "params": vars(args), "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    main()
