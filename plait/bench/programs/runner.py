"""One measured run: a workload's programs on a target, as a batch (throughput) or one at a time
(latency), with the engine's token counters read around it and the calls counted as they go."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from plait.bench.programs.measure import MeasuredBackend, usage_between
from plait.bench.programs.targets import Target
from plait.bench.programs.workload import Structure, Workload, latency_args

MODES = ("batch", "latency")
WARMUP_SEED_OFFSET = 1000  # warm-up programs come from another seed: they share no text with the run
LATENCY_SEED_OFFSET = 1  # nor does the latency run with the batch run


def run_workload(workload: Workload, size: str, target: Target, measured: MeasuredBackend, mode: str, *,
                 seed: int, num_threads: int) -> dict[str, Any]:
    """Run and return the record (a failed run's record carries `error`)."""
    shape = workload.shape(size)
    if mode == "batch":
        args = workload.make_args(shape, seed)
    elif mode == "latency":
        args = latency_args(workload, shape, seed + LATENCY_SEED_OFFSET)
    else:
        raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    expected = [workload.structure(shape, a) for a in args]
    target.flush()
    measured.take_counts()
    before = target.meter()
    latencies: list[float] = []
    states: list[Any] = []
    error = None
    start = time.perf_counter()
    try:
        if mode == "batch":
            states = workload.program.run_batch(args, backend=measured, num_threads=min(num_threads, len(args)))
        else:
            for a in args:
                t0 = time.perf_counter()
                state = workload.program.run(**a, backend=measured)
                state.sync()
                latencies.append(time.perf_counter() - t0)
                states.append(state)
    except Exception as e:  # a program that raises in its body (synchronous execution) fails the run
        error = f"{type(e).__name__}: {e}"
    duration = time.perf_counter() - start
    failed = [st.error() for st in states if st.error() is not None]
    if failed and error is None:
        error = f"{len(failed)} of {len(args)} programs failed; first: {_first_line(failed[0])}"
    usage = usage_between(before, target.meter())
    counts = dict(measured.take_counts())
    want = Structure(*(sum(col) for col in zip(*expected)))
    record: dict[str, Any] = {
        "bench": "programs", "workload": workload.name, "title": workload.title, "mode": mode, "size": size,
        "label": target.label, "backend": target.kind, "server": target.server,
        "programs": len(args), "duration_s": duration, "programs_per_s": len(args) / duration,
        "latency_s_mean": statistics.fmean(latencies) if latencies else None,
        "latency_s_median": statistics.median(latencies) if latencies else None,
        "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
        "computed_prompt_tokens": usage.computed_prompt_tokens, "hit_rate": usage.hit_rate,
        "output_tokens": usage.output_tokens, "forced_tokens": usage.forced_tokens,
        "calls": counts, "expected_calls": want._asdict(),
        "structure_ok": error is None and all(counts.get(k, 0) == v for k, v in want._asdict().items()),
        "valid": None, "error": error, "num_threads": num_threads if mode == "batch" else 1, "seed": seed,
        "exact_lengths": measured.exact_lengths, **target.info,
    }
    if workload.validate is not None and error is None:
        record["valid"] = sum(map(workload.validate, states)) / len(states)
    return record


def warm_up(workload: Workload, size: str, measured: MeasuredBackend, *, seed: int) -> None:
    """Two unmeasured programs (compiles what a first call compiles: grammars, kernels)."""
    args = workload.make_args(workload.shape(size), seed + WARMUP_SEED_OFFSET)[:2]
    try:
        for state in workload.program.run_batch(args, backend=measured, num_threads=len(args)):
            state.sync()
    except Exception:
        pass  # the measured run reports the failure
    measured.take_counts()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def environment() -> dict[str, Any]:
    """Machine, versions and date, for every record."""
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
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "commit": commit}
