"""Latency of one static batch straight on the `ModelRunner` (SGLang's bench_one_batch).

No scheduler, no prefix cache, no sampling beyond argmax: one extend of batch x input_len random
text tokens, then output_len - 1 greedy decode steps (the extend yields the first output token).
This is the ceiling the scheduler's overhead is measured against.

    python -m plait.bench.one_batch --batch-size 1 8 --input-len 512 --output-len 128
    python -m plait.bench.one_batch --model-path llama-3.2-1b --load-format dummy --batch-size 1
    python -m plait.bench.one_batch --model-path llama-3.1-8b --load-format dummy \
        --shapes 1x1024x128 1x4096x8 128x1024x256 --prefill-chunk-tokens 16384 \
        --ceilings ceilings.json --baseline hf.jsonl

Prints prefill latency and throughput (batch x input_len / latency), the median decode step
latency and throughput (batch / median), and the total; appends one JSON line per batch size to
`--result-file`. `--profile-steps N` adds a torch.profiler table of N decode steps; `--phase-profile`
(CPU kernels) splits the prefill's and the decode steps' time by phase of the decoder stack.

With `--ceilings` (from `plait.bench.ceilings`) each figure is also held against the hardware:
the decode step against the time to read what it must read (every weight once, plus the batch's
KV) at the measured copy bandwidth, the prefill against the measured matrix-product rate. With
`--baseline` (JSON lines of `plait.bench.hf_baseline` on the same shapes) each figure is also a
ratio to Hugging Face `transformers`.

The small helpers the other bench programs share (config flags generated from the runtime's
dataclasses, the environment record, JSON lines) live here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from plait.bench.datasets import text_token_ids
from plait.runtime.config import MemoryConfig, ModelConfig


# ---- shared helpers ---------------------------------------------------------------------------------
def add_config_args(
    parser: argparse.ArgumentParser, *config_classes: type, choices: dict[str, Sequence[str]] | None = None
) -> None:
    """One `--field-name` flag per field of the given config dataclasses.

    Flags default to "not given" (argparse.SUPPRESS), so the dataclass keeps the only copy of
    each default; `config_options(args, ...)` returns just the flags the user passed.
    """
    choices = choices or {}
    for cls in config_classes:
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            if f.name == "scheduler" or f.name == "memory" or f.name == "model":
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = str(f.type)
            if kind == "bool":
                group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f"(default {default})")
                continue
            parse = int if kind.startswith("int") else float if kind.startswith("float") else str
            group.add_argument(flag, type=parse, choices=choices.get(f.name), default=argparse.SUPPRESS,
                               help=f"(default {default})")


def config_options(args: argparse.Namespace, *config_classes: type) -> dict[str, Any]:
    names = {f.name for cls in config_classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def model_choices() -> dict[str, Sequence[str]]:
    from plait.runtime.attention.base import ATTENTION_BACKENDS
    from plait.runtime.model_loader import LOAD_FORMATS

    return {"load_format": LOAD_FORMATS, "dtype": ("auto", "bfloat16", "float16", "float32"),
            "attention_backend": tuple(ATTENTION_BACKENDS), "kv_cache_dtype": ("auto", "fp8_e5m2", "fp8_e4m3")}


def environment() -> dict[str, Any]:
    """What a reader needs to compare two result lines: machine, versions, date."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        # Other work on a shared machine skews CPU timings; the 1-minute load average shows it.
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__, "plait_commit": commit,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_result(path: str | None, record: dict[str, Any]) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the measurement ----------------------------------------------------------------------------------
class BatchTiming(NamedTuple):
    prefill_latency_s: float
    decode_latencies_s: list[float]  # one per decode step
    last_token_ids: Sequence[int] = ()  # the tokens the last step produced, one per request


def run_static_batch(
    runner: Any,
    prompts: list[list[int]],
    output_len: int,
    *,
    profile_steps: int = 0,
    prefill_chunk_tokens: int | None = None,
    overlap: bool = False,
    phases: dict[str, Any] | None = None,
) -> tuple[BatchTiming, Any]:
    """Prefill `prompts` as one extend batch (or as batches of whole prompts of at most
    `prefill_chunk_tokens` tokens each), then greedy-decode until each has `output_len` tokens.

    Decode steps run one after another, each read back before the next is built, or with `overlap`
    (CUDA) the way the server's overlap scheduler runs them: the next step is launched before the
    previous one's tokens are read.

    Returns the timing and, with `profile_steps`, the torch.profiler of the last that many steps.
    With `phases` (a dict; CPU kernels), its "prefill" and "decode" entries get the CPU decoder stack's
    time by phase (`kernels.stack_profile`) of the prefill and of all decode steps. The runner's pools are reset first: this owns the whole runner while it runs.
    """
    from plait.runtime.executor.forward_batch import (
        make_decode_batch,
        make_extend_batch,
    )

    runner.allocator.reset()
    runner.req_to_token_pool.reset()
    batch_size = len(prompts)
    rows = [runner.req_to_token_pool.alloc() for _ in prompts]
    assert None not in rows, "more prompts than request rows"
    seq_lens = [len(p) for p in prompts]
    common = {"req_to_token_pool": runner.req_to_token_pool, "kv_pool": runner.kv_pool,
              "attn_backend": runner.attn_backend}

    synchronize(runner.device)
    if phases is not None:
        from plait.runtime.cpu import kernels

        kernels.stack_profile(True)
    start = time.perf_counter()
    next_ids = []
    for group in _prefill_groups(seq_lens, prefill_chunk_tokens):
        slots = runner.allocator.alloc(sum(seq_lens[i] for i in group))
        batch = make_extend_batch(req_pool_indices=[rows[i] for i in group], prefix_lens=[0] * len(group),
                                  new_token_ids=[prompts[i] for i in group], out_cache_loc=slots, **common)
        next_ids += runner.forward(batch).next_token_logits.argmax(-1).tolist()  # the sync point
    prefill_latency = time.perf_counter() - start
    if phases is not None:
        phases["prefill"] = kernels.stack_profile(True)

    profiler = None
    decode_latencies = []
    num_steps = output_len - 1
    if overlap and runner.device.type == "cuda":
        # As the scheduler's overlap loop runs: step i+1 is built and launched (its input ids are
        # step i's argmax, still on the device) before the host reads step i's tokens back, so the
        # GPU always has the next step queued. A step's latency is the time between two read-backs.
        last_ids = torch.tensor(next_ids, dtype=torch.int64).to(runner.device, non_blocking=True)
        pending: tuple[torch.Tensor, torch.cuda.Event] | None = None
        last = time.perf_counter()
        for step in range(num_steps + 1):
            if step < num_steps:
                if profile_steps and step == num_steps - profile_steps:
                    profiler = _start_profiler(runner.device)
                seq_lens = [n + 1 for n in seq_lens]
                slots = runner.allocator.alloc(batch_size)
                batch = make_decode_batch(req_pool_indices=rows, seq_lens=seq_lens, last_token_ids=last_ids,
                                          out_cache_loc=slots, **common)
                last_ids = runner.forward(batch).next_token_logits.argmax(-1)
                host_ids = last_ids.to("cpu", non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            if pending is not None:
                pending[1].synchronize()  # the previous step's tokens only: this step keeps running
                next_ids = pending[0].tolist()
                now = time.perf_counter()
                decode_latencies.append(now - last)
                last = now
            pending = (host_ids, copied) if step < num_steps else None
    else:
        for step in range(num_steps):
            if profile_steps and step == num_steps - profile_steps:
                profiler = _start_profiler(runner.device)
            start = time.perf_counter()
            seq_lens = [n + 1 for n in seq_lens]
            slots = runner.allocator.alloc(batch_size)
            batch = make_decode_batch(req_pool_indices=rows, seq_lens=seq_lens, last_token_ids=next_ids,
                                      out_cache_loc=slots, **common)
            next_ids = runner.forward(batch).next_token_logits.argmax(-1).tolist()
            decode_latencies.append(time.perf_counter() - start)
    if profiler is not None:
        profiler.stop()
    if phases is not None:
        phases["decode"] = kernels.stack_profile(False)
    return BatchTiming(prefill_latency, decode_latencies, next_ids), profiler


def _prefill_groups(seq_lens: list[int], max_tokens: int | None) -> list[list[int]]:
    """Consecutive requests in groups of at most `max_tokens` tokens (a longer prompt alone)."""
    if not max_tokens:
        return [list(range(len(seq_lens)))]
    groups: list[list[int]] = [[]]
    tokens = 0
    for i, n in enumerate(seq_lens):
        if groups[-1] and tokens + n > max_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += n
    return groups


def _start_profiler(device: torch.device) -> Any:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def summarize_timing(timing: BatchTiming, batch_size: int, input_len: int, output_len: int) -> dict[str, float]:
    median_decode = statistics.median(timing.decode_latencies_s) if timing.decode_latencies_s else float("nan")
    total = timing.prefill_latency_s + sum(timing.decode_latencies_s)
    return {
        "prefill_latency_s": timing.prefill_latency_s,
        "prefill_throughput_tok_s": batch_size * input_len / timing.prefill_latency_s,
        "median_decode_latency_s": median_decode,
        "mean_decode_latency_s": statistics.fmean(timing.decode_latencies_s) if timing.decode_latencies_s else None,
        "median_decode_throughput_tok_s": batch_size / median_decode,
        "decode_steps": len(timing.decode_latencies_s),
        "total_latency_s": total,
        "overall_throughput_tok_s": batch_size * (input_len + output_len) / total,
    }


def print_result(label: str, r: dict[str, Any]) -> None:
    print(f"[{label}] batch {r['batch_size']}, input {r['input_len']}, output {r['output_len']}")
    print(f"  Prefill. latency: {r['prefill_latency_s']:.4f} s, throughput: {r['prefill_throughput_tok_s']:10.1f} token/s")
    print(f"  Decode.  median latency: {r['median_decode_latency_s']:.5f} s, "
          f"median throughput: {r['median_decode_throughput_tok_s']:10.1f} token/s")
    print(f"  Total.   latency: {r['total_latency_s']:.3f} s, throughput: {r['overall_throughput_tok_s']:10.1f} token/s",
          flush=True)


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'engine':>8} {'dtype':>9} {'batch':>5} {'in':>5} {'out':>5} {'prefill s':>10} {'prefill tok/s':>13} "
          f"{'decode ms':>10} {'decode tok/s':>12} {'total s':>8}")
    for r in results:
        print(f"{r['engine']:>8} {r['dtype']:>9} {r['batch_size']:>5} {r['input_len']:>5} {r['output_len']:>5} "
              f"{r['prefill_latency_s']:>10.4f} {r['prefill_throughput_tok_s']:>13.1f} "
              f"{1000 * r['median_decode_latency_s']:>10.2f} {r['median_decode_throughput_tok_s']:>12.1f} "
              f"{r['total_latency_s']:>8.3f}")


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, nargs="+", default=[512])
    parser.add_argument("--output-len", type=int, nargs="+", default=[128])
    parser.add_argument("--shapes", nargs="+", default=None, metavar="BxIxO",
                        help="batch x input x output triples, instead of every combination of the three lists")
    parser.add_argument("--warmup", type=int, default=8,
                        help="decode steps of an unmeasured warm-up run per shape, on its first 8 prompts "
                             "(0: no warm-up)")
    parser.add_argument("--result-file", default=None, help="append one JSON line per shape")
    parser.add_argument("--run-name", default="", help="a label stored with the results")
    parser.add_argument("--num-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)


def shapes(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    if args.shapes:
        triples = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes]
        if any(len(t) != 3 or min(t) < 1 for t in triples):
            raise SystemExit(f"--shapes takes BxIxO triples of positive integers, got {args.shapes}")
        return triples  # type: ignore[return-value]
    return [(b, i, o) for b in args.batch_size for i in args.input_len for o in args.output_len]


# ---- the figures against the hardware ceilings and the baseline ------------------------------------
class ModelCosts(NamedTuple):
    """What one step must move and compute, from the model's shapes."""

    weight_read_bytes: int  # a decode step reads every weight once (of the input embedding, one row)
    body_params: int  # parameters of the matrix products applied to every prefill token
    logits_params: int  # the LM head, applied to one token per request
    kv_bytes_per_token: int
    attn_flops_coeff: int  # attention FLOPs of a causal prefill of n tokens: coeff * n^2

    @classmethod
    def of(cls, runner: Any) -> ModelCosts:
        arch, model = runner.arch, runner.model
        # Parameters, and the CPU kernels' stored weights (buffers; a tied head's is the embedding's).
        param_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        embed = model.get_submodule(model.embedding_module_name)
        embed_data = embed.stored.data if hasattr(embed, "stored") else embed.weight
        embed_params = arch.vocab_size * arch.hidden_size
        untied_embed_bytes = 0 if arch.tie_word_embeddings else embed_data.numel() * embed_data.element_size()
        params = runner.num_params
        logits_params = arch.vocab_size * arch.hidden_size
        body = params - embed_params - (0 if arch.tie_word_embeddings else logits_params)
        return cls(
            weight_read_bytes=param_bytes - untied_embed_bytes,
            body_params=body,
            logits_params=logits_params,
            kv_bytes_per_token=runner.kv_bytes_per_token,
            # QK^T and PV: 2 n^2 d multiply-adds per head and layer, halved by the causal mask.
            attn_flops_coeff=2 * arch.num_layers * arch.num_heads * arch.head_dim,
        )

    def prefill_flops(self, batch_size: int, input_len: int) -> float:
        return batch_size * (2 * self.body_params * input_len + 2 * self.logits_params
                             + self.attn_flops_coeff * input_len**2)

    def decode_bytes(self, batch_size: int, context_len: float) -> float:
        return self.weight_read_bytes + batch_size * context_len * self.kv_bytes_per_token


def against_ceilings(costs: ModelCosts, ceilings: Any, r: dict[str, Any]) -> dict[str, float]:
    b, i, o = r["batch_size"], r["input_len"], r["output_len"]
    decode_bytes = costs.decode_bytes(b, i + o / 2)  # the mean context over the decode steps
    floor_s = decode_bytes / ceilings.copy_bytes_per_s
    flops = costs.prefill_flops(b, i)
    achieved = flops / r["prefill_latency_s"]
    return {
        "copy_bytes_per_s": ceilings.copy_bytes_per_s, "matmul_flop_per_s": ceilings.matmul_flop_per_s,
        "decode_bytes_per_step": decode_bytes, "decode_floor_s": floor_s,
        "decode_fraction_of_floor": floor_s / r["median_decode_latency_s"],
        "prefill_flops": flops, "prefill_flop_per_s": achieved,
        "prefill_fraction_of_matmul": achieved / ceilings.matmul_flop_per_s,
    }


def graph_replay_seconds(runner: Any, batch_size: int) -> float | None:
    """Device time of one decode step alone: the median of back-to-back replays of the batch's graph
    (None without one). The gap to the measured step is host work: batch building, the sync, argmax.

    The static inputs still hold the last measured step, so each replay rewrites that step's KV
    slots with the same values."""
    from plait.bench.ceilings import median_seconds

    graphs = runner.graph_runner
    if graphs is None or batch_size > graphs.max_bs:
        return None
    graph = graphs.graphs[graphs.captured_size(batch_size)]
    return median_seconds(graph.replay, device=runner.device, repeats=20, warmup=2)


def against_baseline(baseline: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, float] | None:
    key = (r["batch_size"], r["input_len"], r["output_len"])
    match = [b for b in baseline if (b["batch_size"], b["input_len"], b["output_len"]) == key]
    if not match:
        return None
    hf = match[-1]
    return {
        "hf_median_decode_latency_s": hf["median_decode_latency_s"], "hf_prefill_latency_s": hf["prefill_latency_s"],
        "decode_speedup_vs_hf": hf["median_decode_latency_s"] / r["median_decode_latency_s"],
        "prefill_speedup_vs_hf": hf["prefill_latency_s"] / r["prefill_latency_s"],
    }


def print_against(r: dict[str, Any]) -> None:
    c, h = r.get("ceilings"), r.get("vs_hf")
    if r.get("sync_median_decode_latency_s"):
        print(f"  Decode step read back before the next is built (sync loop): "
              f"{1000 * r['sync_median_decode_latency_s']:.3f} ms; overlapped: {1000 * r['median_decode_latency_s']:.3f} ms")
    if r.get("decode_graph_replay_s"):
        print(f"  Decode step on the device alone (graph replays): {1000 * r['decode_graph_replay_s']:.3f} ms; "
              f"the measured step exceeds it by {1000 * (r['median_decode_latency_s'] - r['decode_graph_replay_s']):.3f} ms")
    if c:
        print(f"  Decode floor: {1000 * c['decode_floor_s']:.3f} ms ({c['decode_bytes_per_step'] / 1e9:.2f} GB at "
              f"{c['copy_bytes_per_s'] / 1e12:.2f} TB/s); measured {1000 * r['median_decode_latency_s']:.3f} ms "
              f"= {100 * c['decode_fraction_of_floor']:.1f}% of the floor")
        print(f"  Prefill: {c['prefill_flop_per_s'] / 1e12:.1f} TFLOP/s of {c['matmul_flop_per_s'] / 1e12:.1f} "
              f"(matmul ceiling) = {100 * c['prefill_fraction_of_matmul']:.1f}%")
    if h:
        print(f"  vs transformers: decode step {h['decode_speedup_vs_hf']:.2f}x faster "
              f"({1000 * h['hf_median_decode_latency_s']:.2f} ms), prefill {h['prefill_speedup_vs_hf']:.2f}x faster "
              f"({h['hf_prefill_latency_s']:.4f} s)")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(parser)
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile the last N decode steps of each measured run; print the top ops")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--phase-profile", action="store_true",
                        help="CPU kernels: split the prefill's and the decode steps' time by phase of the decoder "
                             "stack (norm, qkv, rope_store, attention, o, gate_up, silu_mul, down)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None,
                        help="prefill in extend batches of at most this many tokens (default: one batch)")
    parser.add_argument("--decode-loop", choices=("overlap", "sync", "both"), default="overlap",
                        help="overlap (CUDA; the server's default): launch decode step i+1 before reading step "
                             "i back; sync: read each step back before building the next; both: measure sync "
                             "too and record it beside the overlapped figures")
    parser.add_argument("--ceilings", default=None, help="JSON of plait.bench.ceilings: print fractions of it")
    parser.add_argument("--baseline", default=None,
                        help="JSON lines of plait.bench.hf_baseline on the same shapes: print ratios to it")
    add_config_args(parser, ModelConfig, choices=model_choices())
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    from plait.runtime.executor.model_runner import ModelRunner

    all_shapes = shapes(args)
    max_batch = max(b for b, _, _ in all_shapes)
    max_tokens = max(b * (i + o) for b, i, o in all_shapes)
    options = config_options(args, ModelConfig)
    load_start = time.perf_counter()
    runner = ModelRunner(ModelConfig(**options), MemoryConfig(max_total_tokens=max_tokens + 16,
                                                              max_running_requests=max_batch))
    print(f"loaded {runner.source.path} ({runner.num_params / 1e6:.1f}M parameters, {runner.dtype}, "
          f"{runner.device}) in {time.perf_counter() - load_start:.1f} s; torch threads {torch.get_num_threads()}")
    print(f"memory: {runner.memory_report}", flush=True)
    from plait.bench.ceilings import load as load_ceilings

    ceilings = load_ceilings(args.ceilings)
    baseline = []
    if args.baseline:
        with open(args.baseline) as f:
            baseline = [json.loads(line) for line in f if line.strip()]
    costs = ModelCosts.of(runner)
    token_ids = text_token_ids(runner.tokenizer, runner.vocab_size)
    rng = random.Random(args.seed)
    env = environment()
    results = []
    for batch_size, input_len, output_len in all_shapes:
        prompts = [rng.choices(token_ids, k=input_len) for _ in range(batch_size)]
        if args.warmup:
            run_static_batch(runner, prompts[:8], min(output_len, args.warmup + 1),
                             prefill_chunk_tokens=args.prefill_chunk_tokens)
        overlap = args.decode_loop != "sync" and runner.device.type == "cuda"
        sync_timing = None
        if overlap and args.decode_loop == "both":
            sync_timing, _ = run_static_batch(runner, prompts, output_len, prefill_chunk_tokens=args.prefill_chunk_tokens)
        phases = {} if args.phase_profile and runner.device.type == "cpu" else None
        timing, profiler = run_static_batch(runner, prompts, output_len,
                                            profile_steps=min(args.profile_steps, output_len - 1),
                                            prefill_chunk_tokens=args.prefill_chunk_tokens, overlap=overlap,
                                            phases=phases)
        record = {
            "bench": "one_batch", "engine": "plait", "run_name": args.run_name,
            "model": str(runner.source.path), "load_format": runner.source.load_format,
            "dtype": str(runner.dtype).replace("torch.", ""), "device": str(runner.device),
            "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
            **summarize_timing(timing, batch_size, input_len, output_len),
            "decode_loop": "overlap" if overlap else "sync",
            "cuda_graphs": runner.graph_runner is not None, "torch_compile": runner.model_config.enable_torch_compile,
            "attention_backend": type(runner.attn_backend).__name__,
            "prefill_chunk_tokens": args.prefill_chunk_tokens, "memory": runner.memory_report._asdict(),
            "env": env,
        }
        if sync_timing is not None and sync_timing.decode_latencies_s:
            record["sync_median_decode_latency_s"] = statistics.median(sync_timing.decode_latencies_s)
        record["decode_graph_replay_s"] = graph_replay_seconds(runner, batch_size)
        if ceilings is not None and record["decode_steps"]:
            record["ceilings"] = against_ceilings(costs, ceilings, record)
        if baseline:
            record["vs_hf"] = against_baseline(baseline, record)
        print_result("plait", record)
        print_against(record)
        if profiler is not None:
            print_profile(profiler, args.profile_steps, args.profile_rows)
        if phases:
            record["phases_ms"] = print_phases(phases)
        write_result(args.result_file, record)
        results.append(record)
    print_table(results)
    return results


def print_phases(phases: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Print the decoder stack's time by phase, per step, for the prefill and the decode steps."""
    out = {}
    for part in ("prefill", "decode"):
        steps, seconds = phases[part]
        if not steps:
            continue
        per_step = {name: 1000 * s / steps for name, s in seconds.items()}
        out[part] = per_step
        print(f"  {part} phases, ms a step ({steps} steps; sum {sum(per_step.values()):.2f}): "
              + ", ".join(f"{name} {ms:.2f}" for name, ms in per_step.items()))
    sys.stdout.flush()
    return out


def print_profile(profiler: Any, steps: int, rows: int) -> None:
    averages = profiler.key_averages()
    total_us = sum(e.self_cpu_time_total for e in averages)
    print(f"\n  torch.profiler over {steps} decode steps: {total_us / 1000 / steps:.2f} ms of op self-time per step")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
