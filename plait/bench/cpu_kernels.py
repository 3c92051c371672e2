"""Timing of the CPU kernels' large products and prefill attention, each path side by side.

    python -m plait.bench.cpu_kernels [--threads 2] [--output out.jsonl]

- Products of 512 rows with the default model's shapes (QKV 576 -> 960, gate/up 576 -> 3,072, down
  1,536 -> 576): the float32 panels over a Q4_1 weight, the int16 panels (x rounded to int16 per 32
  values, integer products on AVX-512 VNNI: `--cpu-prefill-products int16`), the AMX products in
  three bfloat16 passes and in one (`--cpu-prefill-products amx` / `amx-bf16`), and PyTorch's own
  bfloat16 product (oneDNN) for reference.
- Causal attention of a 512-token chunk over 512, 4,096 and 8,000 keys (9 query heads, 3 KV heads,
  head size 64, float16 pool: the default model): the vector kernels, AMX in three passes and in one.

Median of `--repeats` calls each; prints a table and appends one JSON line to `--output`. The AMX rows
are left out where the CPU has no AMX, the int16 ones where it has no AVX-512 VNNI.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from plait.bench.one_batch import environment
from plait.runtime.cpu import kernels
from plait.runtime.cpu.kernels import WeightFormat

PRODUCTS = {"qkv": (576, 960), "gate_up": (576, 3072), "down": (1536, 576)}
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def product_rows(rows: int, repeats: int) -> list[dict]:
    amx = kernels.amx_available()
    out = []
    for name, (k, n) in PRODUCTS.items():
        torch.manual_seed(0)
        w, x = torch.randn(n, k), torch.randn(rows, k)
        raw = torch.from_numpy(np.ascontiguousarray(quantize(w.numpy(), GGMLQuantizationType.Q4_1))).view(torch.uint8)
        fmt, data = kernels.float_constants(WeightFormat.Q4_1, raw)
        # Outputs written into tensors made once, as the model's stack does: a fresh [512, 3,072] float32
        # output a call costs its page faults (about 2 ms on a 2-core VM), which is not the product's time.
        y, y_b = torch.empty(rows, n), torch.empty(rows, n, dtype=torch.bfloat16)
        row = {"product": name, "m": rows, "k": k, "n": n,
               "float_panels_ms": median_ms(lambda: kernels.linear(x, data, fmt, n, out=y), repeats)}
        if kernels.int16_panels_available():
            row["int16_panels_ms"] = median_ms(lambda: kernels.linear(x, data, fmt, n, panels="int16", out=y), repeats)
        if amx:
            exact, one = kernels.amx_pack(w), kernels.amx_pack(w, exact=False)
            row["amx_ms"] = median_ms(lambda: kernels.amx_linear(x, exact, n, out=y), repeats)
            row["amx_bf16_ms"] = median_ms(lambda: kernels.amx_linear(x, one, n, out=y), repeats)
        xb, wbt = x.bfloat16(), w.bfloat16().T
        row["torch_bf16_ms"] = median_ms(lambda: torch.matmul(xb, wbt, out=y_b), repeats)
        row["gmac"] = rows * k * n / 1e9
        out.append(row)
    return out


def attention_rows(chunk: int, contexts: list[int], repeats: int) -> list[dict]:
    modes = (["float"] + (["int16"] if kernels.int16_attention_available(HEAD_DIM) else [])
             + (["amx", "amx-bf16"] if kernels.amx_available() else []))
    out = []
    for length in contexts:
        torch.manual_seed(0)
        q = torch.randn(chunk, HEADS, HEAD_DIM)
        k_cache = torch.randn(length, KV_HEADS, HEAD_DIM).half()
        v_cache = torch.randn(length, KV_HEADS, HEAD_DIM).half()
        meta = dict(q_rows=torch.arange(chunk), q_off=torch.tensor([0]), q_len=torch.tensor([chunk]),
                    slots=torch.arange(length), slot_off=torch.tensor([0]), kv_len=torch.tensor([length]),
                    causal=True, scale=HEAD_DIM**-0.5)
        row = {"chunk": chunk, "keys": length}
        for mode in modes:
            key = {"float": "vector_ms", "int16": "int16_ms", "amx": "amx_ms", "amx-bf16": "amx_bf16_ms"}[mode]
            row[key] = median_ms(lambda: kernels.attention(q, k_cache, v_cache, arith=mode, **meta), repeats)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: as set)")
    parser.add_argument("--rows", type=int, default=512, help="rows of the products (a prefill chunk)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 8000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default="cpu_kernels.jsonl")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the CPU kernels are not built or cannot run here")
    if args.threads:
        torch.set_num_threads(args.threads)
    products = product_rows(args.rows, args.repeats)
    attention = attention_rows(args.rows, args.contexts, args.repeats)
    print(f"products of {args.rows} rows (ms; threads {torch.get_num_threads()}, AMX {kernels.amx_available()})")
    print(f"{'product':>8} {'K':>6} {'N':>6} {'float':>8} {'int16':>8} {'amx':>8} {'amx-bf16':>9} {'torch bf16':>11}"
          f" {'int16 GMAC/s':>13} {'bf16 GMAC/s':>12}")
    for r in products:
        print(f"{r['product']:>8} {r['k']:>6} {r['n']:>6} {r['float_panels_ms']:>8.3f} "
              f"{r.get('int16_panels_ms', float('nan')):>8.3f} {r.get('amx_ms', float('nan')):>8.3f} "
              f"{r.get('amx_bf16_ms', float('nan')):>9.3f} {r['torch_bf16_ms']:>11.3f} "
              f"{r['gmac'] / r.get('int16_panels_ms', float('nan')) * 1e3:>13.1f} {r['gmac'] / r['torch_bf16_ms'] * 1e3:>12.1f}")
    print(f"causal attention of {args.rows} query tokens (ms; {HEADS} heads, {KV_HEADS} KV heads, float16 pool)")
    print(f"{'keys':>6} {'float':>8} {'int16':>8} {'amx':>8} {'amx-bf16':>9}")
    for r in attention:
        print(f"{r['keys']:>6} {r['vector_ms']:>8.2f} {r.get('int16_ms', float('nan')):>8.2f} "
              f"{r.get('amx_ms', float('nan')):>8.2f} {r.get('amx_bf16_ms', float('nan')):>9.2f}")
    with open(args.output, "a") as f:
        f.write(json.dumps({"environment": environment(), "products": products, "attention": attention}) + "\n")


if __name__ == "__main__":
    main()
