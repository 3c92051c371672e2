"""Agent-workflow benchmark in KVFlow's shape, and a long multi-turn chat, over three cache setups.

Agents with large fixed prompts (system prompt, tools, memory) take turns in a cycle; each step
sends an agent's prompt plus a short task and generates a short answer. Several workflows run the
same agents concurrently, each at its own step. The KV pool holds only some of the agents'
prompts, so what the cache keeps decides how much is recomputed:

    (a) lru        the radix cache alone, LRU eviction: an evicted prompt is recomputed
    (b) tiers+lru  a host-memory tier under it (HiCache-style), LRU: an evicted prompt is copied back
    (c) workflow   tiers + workflow-aware eviction (steps-to-execution) + prefetch of the next agent

The chat workload (many sessions, each turn appending to its history, the pool holding a few
histories) compares (a) and (b): there tiers alone help.

    python -m plait.bench.workflow --output-file workflow.json
    python -m plait.bench.workflow --num-agents 6 --prompt-len 2048 --workflows 1,4 --rounds 3
    python -m plait.bench.workflow -- --dtype float32      # flags after -- go to every engine
    python -m plait.bench.workflow --model-path llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --tokenizer-path TOK --prompt-len 4096 --workflows 1,4     # a GPU, 8B shapes, random weights

Prints the CPU (lscpu's model name), the GPU if there is one, and each figure as measured, then a
table; writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import subprocess
import tempfile
import threading
import time
from typing import Any

from plait.bench.one_batch import environment

MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "a": ("lru (no tiers)", {}),
    "b": ("tiers + lru", {"enable_hierarchical_cache": True}),
    "c": ("tiers + workflow + prefetch", {"enable_hierarchical_cache": True, "radix_eviction_policy": "workflow"}),
}


def cpu_model() -> str:
    """lscpu's model name, with its core and thread counts."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return environment()["cpu"]
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("Model name", "unknown CPU")
    return f"{name} ({fields.get('CPU(s)', '?')} CPUs, {fields.get('Thread(s) per core', '?')} threads per core)"


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    # Ordinary tokens (the default model's special ones are at the start of its vocabulary).
    lo, hi = min(1000, vocab_size // 4), min(20000, vocab_size)
    return [rng.randrange(lo, hi) for _ in range(n)]


def _tier_summary(engine: Any) -> dict[str, Any]:
    state = engine.get_server_info()["internal_states"][0]
    cache = state["cache"]
    tiers = cache.get("tiers") or {}
    keys = ("device_hit_tokens", "host_hit_tokens", "storage_hit_tokens", "storage_write_tokens", "load_tokens",
            "backup_tokens",
            "bytes_to_device", "bytes_to_host", "prefetch_started", "prefetch_hits", "prefetch_late",
            "prefetch_unused_tokens", "prefetch_skipped", "device_evicted_tokens", "dropped_tokens")
    out = {"hit_rate": cache["hit_rate"], "evicted_tokens": cache["evicted_tokens"],
           "integrity_ok": state["debug"]["integrity"]["ok"]}
    out.update({k: tiers.get(k, 0) for k in keys})
    return out


def _engine(mode: str, args: argparse.Namespace, max_total_tokens: int, extra: dict[str, Any]) -> Any:
    from plait.runtime.engine import Engine

    options = {**MODES[mode][1], "max_total_tokens": max_total_tokens, **extra}
    if MODES[mode][1].get("enable_hierarchical_cache"):
        options.setdefault("hicache_ratio", args.hicache_ratio)
        if args.storage_dir:  # a file tier under the host tier, one folder per engine
            options.setdefault("hicache_storage_backend", "file")
            options.setdefault("hicache_storage_dir", tempfile.mkdtemp(prefix=f"workflow-{mode}-", dir=args.storage_dir))
    for name in ("load_format", "dtype", "tokenizer_path"):  # given: every engine gets it
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    engine = Engine(args.model_path, **options)
    engine.generate(input_ids=[engine.runner.vocab_size // 4] * 8, sampling_params={"max_new_tokens": 2})  # warm-up
    return engine


def run_agents(engine: Any, mode: str, args: argparse.Namespace, num_workflows: int) -> dict[str, Any]:
    rng = random.Random(args.seed)
    vocab = engine.runner.vocab_size
    # Shared agents: every workflow runs the same agents (the same prompts); private: each its own.
    num_sets = num_workflows if args.private_agents else 1
    prompt_sets = [[_tokens(rng, args.prompt_len, vocab) for _ in range(args.num_agents)] for _ in range(num_sets)]

    def agent_name(w: int, i: int) -> str:
        return f"wf{w}-agent{i}" if args.private_agents else f"agent{i}"

    def steps(w: int) -> list[dict[str, Any]]:
        return [{"id": f"s{i}", "agents": [agent_name(w, i)], "next": [f"s{(i + 1) % args.num_agents}"]}
                for i in range(args.num_agents)]
    params = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def workflow(w: int) -> None:
        wrng = random.Random(args.seed * 1000 + w)
        wf = f"wf{w}"
        prompts = prompt_sets[w if args.private_agents else 0]
        if mode == "c":
            engine.publish_workflow(wf, steps(w), current_step=f"s{(w - 1) % args.num_agents}")
        try:
            for _ in range(args.rounds):
                for k in range(args.num_agents):
                    i = (k + w) % args.num_agents  # workflows start at different agents
                    ids = prompts[i] + _tokens(wrng, args.task_len, vocab)
                    start = time.perf_counter()
                    engine.generate(input_ids=ids, sampling_params=params, workflow_id=wf, agent=agent_name(w, i))
                    with lock:
                        latencies.append(time.perf_counter() - start)
        except BaseException as e:  # reported after the run
            errors.append(e)

    threads = [threading.Thread(target=workflow, args=(w,)) for w in range(num_workflows)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return {"wall_s": wall, "requests": len(latencies), "mean_latency_s": sum(latencies) / len(latencies),
            **_tier_summary(engine)}


def run_chat(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed + 7)
    vocab = engine.runner.vocab_size
    system = _tokens(rng, args.chat_system_len, vocab)
    histories = [system + _tokens(rng, args.chat_turn_len, vocab) for _ in range(args.chat_sessions)]
    params = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    latencies = []
    start = time.perf_counter()
    for _ in range(args.chat_turns):
        for s in range(args.chat_sessions):  # sessions take turns: a user answers while others run
            t0 = time.perf_counter()
            out = engine.generate(input_ids=histories[s], sampling_params=params)
            latencies.append(time.perf_counter() - t0)
            histories[s] = histories[s] + out["output_ids"] + _tokens(rng, args.chat_turn_len, vocab)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "requests": len(latencies), "mean_latency_s": sum(latencies) / len(latencies),
            "final_history_tokens": max(len(h) for h in histories), **_tier_summary(engine)}


def _free_memory() -> None:
    """Give a stopped engine's memory back before the next one loads (one GPU holds one model
    comfortably, not a pile of them waiting for the garbage collector)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _extra_options(extra: list[str]) -> dict[str, Any]:
    """Engine options from `--flag value` pairs after `--`."""
    from plait.runtime.cli_args import add_runtime_args, runtime_options

    parser = argparse.ArgumentParser(add_help=False)
    add_runtime_args(parser)
    defaults = runtime_options(parser.parse_args([]))
    given = runtime_options(parser.parse_args(extra))
    return {k: v for k, v in given.items() if v != defaults[k]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the bundled default model")
    parser.add_argument("--load-format", default=None, choices=["auto", "safetensors", "gguf", "dummy"],
                        help="dummy: random weights of the model's shapes (a preset name as --model-path)")
    parser.add_argument("--dtype", default=None, help="weights and activations, e.g. bfloat16 on a GPU")
    parser.add_argument("--tokenizer-path", default=None, help="a tokenizer for a dummy-weight preset")
    parser.add_argument("--num-agents", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=1024, help="tokens of each agent's fixed prompt")
    parser.add_argument("--task-len", type=int, default=32, help="tokens each step adds to the agent's prompt")
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="times each workflow goes round its agents")
    parser.add_argument("--workflows", default="1,4", help="concurrent workflows, one run per value")
    parser.add_argument("--private-agents", action="store_true",
                        help="each workflow runs its own agents (own prompts); default: all share the same agents")
    parser.add_argument("--pool-agents", type=float, default=None,
                        help="KV pool size in agent prompts (default: half the agents, at least the "
                             "concurrent workflows' needs)")
    parser.add_argument("--hicache-ratio", type=float, default=2.0)
    parser.add_argument("--storage-dir", default=None,
                        help="give the tiered setups (b, c) a file tier under the host tier, in a new folder here")
    parser.add_argument("--modes", default="a,b,c")
    parser.add_argument("--chat-sessions", type=int, default=4)
    parser.add_argument("--chat-turns", type=int, default=4)
    parser.add_argument("--chat-system-len", type=int, default=256)
    parser.add_argument("--chat-turn-len", type=int, default=128)
    parser.add_argument("--chat-pool", type=int, default=2048, help="KV pool tokens for the chat workload")
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-file", default=None, help="write the results as JSON here")
    argv = list(argv) if argv is not None else None
    import sys

    raw = sys.argv[1:] if argv is None else argv
    extra_args = raw[raw.index("--") + 1:] if "--" in raw else []
    args = parser.parse_args(raw[: raw.index("--")] if "--" in raw else raw)
    extra = _extra_options(extra_args)
    logging.getLogger("plait").setLevel(logging.WARNING)
    modes = args.modes.split(",")
    concurrency = [int(x) for x in args.workflows.split(",")]

    env = {**environment(), "cpu": cpu_model()}
    print(f"CPU: {env['cpu']}")
    if env.get("gpu"):
        print(f"GPU: {env['gpu']}")
    print(f"date: {env['date']}  torch threads: {env['torch_threads']}  commit: {env['plait_commit']}")
    results: dict[str, Any] = {"environment": env, "args": vars(args), "engine_options": extra, "agents": [],
                               "chat": []}
    step_tokens = args.prompt_len + args.task_len + args.output_len
    for num_workflows in concurrency:
        pool_agents = args.pool_agents or max(args.num_agents / 2, num_workflows + 1.5)
        pool = int(pool_agents * step_tokens)
        print(f"\nagent workflow: {args.num_agents} {'private ' if args.private_agents else ''}agents x "
              f"{args.prompt_len}-token prompts, {num_workflows} "
              f"workflow(s) x {args.rounds} rounds, KV pool {pool} tokens ({pool_agents:g} agents' steps)")
        rows = {}
        for mode in modes:
            engine = _engine(mode, args, pool, extra)
            try:
                row = run_agents(engine, mode, args, num_workflows)
            finally:
                engine.shutdown()
                engine = None
                _free_memory()
            row.update(mode=mode, setup=MODES[mode][0], workflows=num_workflows, pool_tokens=pool)
            rows[mode] = row
            results["agents"].append(row)
            print(f"  ({mode}) {row['setup']:<28} {row['wall_s']:7.2f} s  {row['requests'] / row['wall_s']:6.2f} req/s"
                  f"  hit rate {row['hit_rate']:.2f}  host hits {row['host_hit_tokens']}  prefetch hits "
                  f"{row['prefetch_hits']}/late {row['prefetch_late']}  to device {row['bytes_to_device'] / 2**20:.0f} MiB"
                  f"  to host {row['bytes_to_host'] / 2**20:.0f} MiB")
        for base in ("a", "b"):
            if "c" in rows and base in rows:
                rows["c"][f"speedup_vs_{base}"] = rows[base]["wall_s"] / rows["c"]["wall_s"]
        if "c" in rows:
            print("  (c) speedup: " + ", ".join(f"{rows['c'][k]:.2f}x vs ({k[-1]})" for k in rows["c"]
                                                if k.startswith("speedup_vs_")))
    if not args.skip_chat:
        print(f"\nmulti-turn chat: {args.chat_sessions} sessions x {args.chat_turns} turns, KV pool {args.chat_pool} tokens")
        rows = {}
        for mode in [m for m in modes if m in ("a", "b")]:
            engine = _engine(mode, args, args.chat_pool, extra)
            try:
                row = run_chat(engine, args)
            finally:
                engine.shutdown()
                engine = None
                _free_memory()
            row.update(mode=mode, setup=MODES[mode][0], pool_tokens=args.chat_pool)
            rows[mode] = row
            results["chat"].append(row)
            print(f"  ({mode}) {row['setup']:<28} {row['wall_s']:7.2f} s  hit rate {row['hit_rate']:.2f}  "
                  f"host hits {row['host_hit_tokens']}  to device {row['bytes_to_device'] / 2**20:.0f} MiB")
        if "a" in rows and "b" in rows:
            rows["b"]["speedup_vs_a"] = rows["a"]["wall_s"] / rows["b"]["wall_s"]
            print(f"  (b) speedup: {rows['b']['speedup_vs_a']:.2f}x vs (a)")
    _print_table(results)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _print_table(results: dict[str, Any]) -> None:
    print("\n| workload | setup | wall s | req/s | hit rate | host hits (tok) | to device (MiB) | to host (MiB) "
          "| prefetch hits / late | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, rows in (("agents", results["agents"]), ("chat", results["chat"])):
        for r in rows:
            name = f"agents, {r['workflows']} wf" if kind == "agents" else "chat"
            speed = ", ".join(f"{v:.2f}x vs ({k[-1]})" for k, v in r.items() if k.startswith("speedup_vs_"))
            print(f"| {name} | ({r['mode']}) {r['setup']} | {r['wall_s']:.2f} | {r['requests'] / r['wall_s']:.2f} | "
                  f"{r['hit_rate']:.2f} | {r['host_hit_tokens']} | {r['bytes_to_device'] / 2**20:.0f} | "
                  f"{r['bytes_to_host'] / 2**20:.0f} | {r['prefetch_hits']} / {r['prefetch_late']} | {speed} |")


if __name__ == "__main__":
    main()
