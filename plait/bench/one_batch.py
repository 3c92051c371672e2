"""Latency of one static batch straight on the `ModelRunner` (SGLang's bench_one_batch).

No scheduler, no prefix cache, no sampling beyond argmax: one extend of batch x input_len random
text tokens, then output_len - 1 greedy decode steps (the extend yields the first output token).
This is the ceiling the scheduler's overhead is measured against.

    python -m plait.bench.one_batch --batch-size 1 8 --input-len 512 --output-len 128
    python -m plait.bench.one_batch --model-path llama-3.2-1b --load-format dummy --batch-size 1

Prints prefill latency and throughput (batch x input_len / latency), the median decode step
latency and throughput (batch / median), and the total; appends one JSON line per batch size to
`--result-file`. `--profile-steps N` adds a torch.profiler table of N decode steps.

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
            "attention_backend": tuple(ATTENTION_BACKENDS)}


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


def run_static_batch(
    runner: Any,
    prompts: list[list[int]],
    output_len: int,
    *,
    profile_steps: int = 0,
) -> tuple[BatchTiming, Any]:
    """Prefill `prompts` as one extend batch, then greedy-decode until each has `output_len` tokens.

    Returns the timing and, with `profile_steps`, the torch.profiler of the last that many steps.
    The runner's pools are reset first: this owns the whole runner while it runs.
    """
    from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch

    runner.allocator.reset()
    runner.req_to_token_pool.reset()
    batch_size = len(prompts)
    rows = [runner.req_to_token_pool.alloc() for _ in prompts]
    assert None not in rows, "more prompts than request rows"
    seq_lens = [len(p) for p in prompts]
    common = {"req_to_token_pool": runner.req_to_token_pool, "kv_pool": runner.kv_pool,
              "attn_backend": runner.attn_backend}

    synchronize(runner.device)
    start = time.perf_counter()
    slots = runner.allocator.alloc(sum(seq_lens))
    batch = make_extend_batch(req_pool_indices=rows, prefix_lens=[0] * batch_size, new_token_ids=prompts,
                              out_cache_loc=slots, **common)
    next_ids = runner.forward(batch).next_token_logits.argmax(-1).tolist()  # the sync point
    prefill_latency = time.perf_counter() - start

    profiler = None
    decode_latencies = []
    num_steps = output_len - 1
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
    return BatchTiming(prefill_latency, decode_latencies), profiler


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
    parser.add_argument("--warmup", type=int, default=8,
                        help="decode steps of an unmeasured warm-up run per shape (0: no warm-up)")
    parser.add_argument("--result-file", default=None, help="append one JSON line per shape")
    parser.add_argument("--run-name", default="", help="a label stored with the results")
    parser.add_argument("--num-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)


def shapes(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    return [(b, i, o) for b in args.batch_size for i in args.input_len for o in args.output_len]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_shape_args(parser)
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile the last N decode steps of each measured run; print the top ops")
    parser.add_argument("--profile-rows", type=int, default=25)
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
    token_ids = text_token_ids(runner.tokenizer, runner.vocab_size)
    rng = random.Random(args.seed)
    env = environment()
    results = []
    for batch_size, input_len, output_len in all_shapes:
        prompts = [rng.choices(token_ids, k=input_len) for _ in range(batch_size)]
        if args.warmup:
            run_static_batch(runner, prompts, min(output_len, args.warmup + 1))
        timing, profiler = run_static_batch(runner, prompts, output_len,
                                            profile_steps=min(args.profile_steps, output_len - 1))
        record = {
            "bench": "one_batch", "engine": "plait", "run_name": args.run_name,
            "model": str(runner.source.path), "load_format": runner.source.load_format,
            "dtype": str(runner.dtype).replace("torch.", ""), "device": str(runner.device),
            "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
            **summarize_timing(timing, batch_size, input_len, output_len),
            "env": env,
        }
        print_result("plait", record)
        if profiler is not None:
            print_profile(profiler, args.profile_steps, args.profile_rows)
        write_result(args.result_file, record)
        results.append(record)
    print_table(results)
    return results


def print_profile(profiler: Any, steps: int, rows: int) -> None:
    averages = profiler.key_averages()
    total_us = sum(e.self_cpu_time_total for e in averages)
    print(f"\n  torch.profiler over {steps} decode steps: {total_us / 1000 / steps:.2f} ms of op self-time per step")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
