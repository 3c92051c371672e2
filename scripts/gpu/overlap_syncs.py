"""Where the overlapped scheduler loop still waits for the device.

Drives the scheduler by hand over decode steps of a small model (dummy weights) with CUDA's sync
debug mode on, and prints each host-device synchronization site in plait with its count, plus the
host time per step with overlap on and off.

    python scripts/gpu/overlap_syncs.py [--model-path llama-3.2-1b] [--batch 64]
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
import warnings

import torch

from plait.runtime.engine import Engine
from plait.runtime.scheduler.io import GenerateRequest
from plait.runtime.scheduler.scheduler import Scheduler
from plait.sampling_params import SamplingParams


def drive(engine: Engine, *, overlap: bool, batch: int, input_len: int, output_len: int, trace: bool) -> None:
    config = engine.config.scheduler.__class__(**{**engine.config.scheduler.__dict__,
                                                  "disable_overlap_schedule": not overlap,
                                                  "enable_overlap_schedule": overlap})
    sched = Scheduler(engine.runner, config, on_output=lambda outputs: None)
    for i in range(batch):
        # Output lengths spread over the run, so requests finish in many different steps.
        params = SamplingParams(max_new_tokens=output_len // 2 + i * output_len // (2 * batch), temperature=0,
                                ignore_eos=True)
        sched.submit(GenerateRequest(rid=f"r{i}", input_ids=[(i * 31 + j) % 1000 + 1 for j in range(input_len)],
                                     sampling_params=params))
    while not sched.running or sched.waiting or sched.chunked:  # prefill everything first
        sched.step()
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/plait/" in f.filename]
        site = " <- ".join(f"{f.filename.split('/plait/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        sites[site or f"{filename}:{lineno}"] += 1

    torch.cuda.synchronize()
    steps, start = 0, time.perf_counter()
    if trace:
        warnings.showwarning = record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    while sched.has_work:
        sched.step()
        steps += 1
    if trace:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"overlap={'on' if overlap else 'off'} trace={trace}: {steps} steps, {elapsed / steps * 1e3:.2f} ms/step, "
          f"{sched.stats['generated_tokens']} tokens, overlapped steps {sched.stats['overlapped_steps']}")
    if trace:
        print(f"  synchronizing calls over {steps} steps:")
        for site, count in sites.most_common():
            print(f"  {count:6d}  {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    engine = Engine(args.model_path, load_format="dummy", dtype="bfloat16", context_length=2048,
                    max_running_requests=max(args.batch, 8))
    engine.shutdown()  # the loop is driven here, on this thread
    kw = {"batch": args.batch, "input_len": args.input_len, "output_len": args.output_len}
    drive(engine, overlap=True, trace=True, **kw)
    for overlap in (True, False, True, False):
        drive(engine, overlap=overlap, trace=False, **kw)


if __name__ == "__main__":
    main()
