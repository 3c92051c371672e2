"""How fast KV moves between the device pool and the host tier, against the copy engine's rate.

    python -m plait.bench.kv_copies [--tokens 4096] [--layers 32 --kv-heads 8 --head-dim 128] [--output out.json]

On one CUDA device, with a KV pool of the given shapes (default: Llama-3.1-8B's, bfloat16), times
`HostKVPool.backup` (device -> host) and `HostKVPool.load` (host -> device) of `--tokens` tokens
whose device slots are scattered, with host slots in one run (as a fresh node's are), in runs of 64
and in runs of 4 (below `HostKVPool.MIN_MEAN_RUN`, the CPU-gather path). The ceiling beside them is
one pinned host buffer of the same bytes copied to the device and back in a single transfer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from plait.runtime.memory.host_pool import HostKVPool
from plait.runtime.memory.kv_pool import KVPool


def _seconds(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _host_slots(n: int, run: int, num_slots: int) -> torch.Tensor:
    """n host slots in runs of `run` consecutive ids, the runs spread over the pool."""
    if run >= n:
        return torch.arange(1, n + 1)
    starts = torch.randperm(num_slots // run - 1)[: (n + run - 1) // run] * run + 1
    return (starts[:, None] + torch.arange(run)[None, :]).flatten()[:n]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kv_copies needs a CUDA device")
    n, num_slots = args.tokens, 4 * args.tokens
    pool = KVPool(num_slots=num_slots, num_layers=args.layers, num_kv_heads=args.kv_heads,
                  head_dim=args.head_dim, dtype=torch.bfloat16, device="cuda")
    for b in pool.k_buffers + pool.v_buffers:
        b.normal_()
    host = HostKVPool(pool, num_slots)
    nbytes = n * host.bytes_per_token
    device_slots = (torch.randperm(num_slots)[:n] + 1).cuda()

    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ceiling_h2d = _seconds(lambda: on_device.copy_(pinned, non_blocking=True), args.repeats)
    ceiling_d2h = _seconds(lambda: pinned.copy_(on_device, non_blocking=True), args.repeats)
    print(f"device: {torch.cuda.get_device_name()}; {n} tokens, {nbytes / 2**20:.0f} MiB of KV")
    print(f"{'case':<28}{'ms':>9}{'GB/s':>9}")
    rows = [{"case": "ceiling: one copy to device", "seconds": ceiling_h2d},
            {"case": "ceiling: one copy to host", "seconds": ceiling_d2h}]
    for run in (n, 64, 4):
        slots = _host_slots(n, run, num_slots)
        backup = _seconds(lambda: (host.backup(device_slots, slots), host.wait_backups()), args.repeats)
        load = _seconds(lambda: host.load(slots, device_slots), args.repeats)
        label = "one run" if run >= n else f"runs of {run}"
        rows += [{"case": f"backup, host slots in {label}", "seconds": backup},
                 {"case": f"load, host slots in {label}", "seconds": load}]
        # the round trip is exact
        host.backup(device_slots, slots)
        expect = [pool.k_buffers[i][device_slots].clone() for i in (0, args.layers - 1)]
        for i in (0, args.layers - 1):
            pool.k_buffers[i][device_slots] = 0
        host.load(slots, device_slots)
        assert all(torch.equal(pool.k_buffers[i][device_slots], e) for i, e in zip((0, args.layers - 1), expect))
    for row in rows:
        row["gb_per_s"] = nbytes / row["seconds"] / 1e9
        print(f"{row['case']:<28}{row['seconds'] * 1e3:>9.2f}{row['gb_per_s']:>9.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": n, "bytes": nbytes, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
