"""The two hardware ceilings every GPU figure is held against, measured on the machine itself.

    python -m plait.bench.ceilings [--output ceilings.json]

- Copy bandwidth: a device-to-device copy of a large buffer (2 GiB by default, far past any
  cache), counting the bytes read plus the bytes written. Decoding a batch of one reads every weight
  once per token, so weight bytes over this bandwidth is the floor of a decode step.
- Matrix-product rate: a square bf16 product (8192 by default) on random data (zeros run faster
  and would flatter the ceiling), 2 n^3 operations. Prefill is matrix products, so its achieved
  rate is held against this one.

Each figure is the median of `--repeats` timed runs after warm-up, timed with device events.
On the CPU (for tests) the same code runs with small sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class Ceilings(NamedTuple):
    copy_bytes_per_s: float  # bytes read + bytes written per second
    matmul_flop_per_s: float  # bf16 (or the given dtype) matrix product
    device: str
    copy_bytes: int
    matmul_n: int
    matmul_dtype: str

    def to_json(self) -> dict[str, Any]:
        return {**self._asdict(), "copy_tb_s": self.copy_bytes_per_s / 1e12, "matmul_tflop_s": self.matmul_flop_per_s / 1e12}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Ceilings:
        return cls(**{k: record[k] for k in cls._fields})


def median_seconds(fn: Callable[[], Any], *, device: torch.device, repeats: int, warmup: int) -> float:
    """Median time of one `fn()` call: device events on CUDA, a host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, *, nbytes: int = 2 << 30, repeats: int = 20) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device=device, repeats=repeats, warmup=3)
    assert torch.equal(dst[:4096], src[:4096]) and torch.equal(dst[-4096:], src[-4096:])
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, *, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.matmul(a, b, out=out), device=device, repeats=repeats, warmup=3)
    return 2 * n**3 / seconds


def measure(device: torch.device | str | None = None, *, copy_bytes: int = 2 << 30, matmul_n: int = 8192,
            dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> Ceilings:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Ceilings(
        copy_bytes_per_s=copy_bandwidth(device, nbytes=copy_bytes, repeats=repeats),
        matmul_flop_per_s=matmul_rate(device, n=matmul_n, dtype=dtype, repeats=repeats),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        copy_bytes=copy_bytes,
        matmul_n=matmul_n,
        matmul_dtype=str(dtype).replace("torch.", ""),
    )


def load(path: str | None) -> Ceilings | None:
    if not path:
        return None
    with open(path) as f:
        return Ceilings.from_json(json.load(f))


def main(argv: list[str] | None = None) -> Ceilings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--copy-mib", type=int, default=2048)
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    ceilings = measure(args.device, copy_bytes=args.copy_mib << 20, matmul_n=args.matmul_n, repeats=args.repeats)
    print(f"{ceilings.device}: copy {ceilings.copy_bytes_per_s / 1e12:.3f} TB/s (read + write, "
          f"{args.copy_mib} MiB), bf16 matmul {ceilings.matmul_flop_per_s / 1e12:.1f} TFLOP/s (n = {args.matmul_n})",
          flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(ceilings.to_json(), f, indent=1)
    return ceilings


if __name__ == "__main__":
    main()
