"""How close the decode step's matrix products come to reading their weights at copy bandwidth.

Times `torch.nn.functional.linear` on each of a preset's per-layer weight shapes (QKV, O, gate/up,
down) and the LM head at a few token counts, in CUDA graphs of enough layers' worth of distinct
weights to defeat L2, against bytes read (weight + activations) / measured copy bandwidth. With
`--blas cublaslt` the same through torch's cuBLASLt path, to compare the library's choices.

    python3 scripts/gpu/gemm_shapes.py [--preset llama-3.1-8b] [--tokens 1 128] [--blas default cublaslt]
"""

from __future__ import annotations

import argparse

import torch

from plait.bench.ceilings import copy_bandwidth, median_seconds
from plait.runtime.model_loader.dummy import preset_config


def shapes(config: dict) -> list[tuple[str, int, int, int]]:
    """(name, out_features, in_features, count per model) of the decode step's products."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers = config["num_hidden_layers"]
    return [
        ("qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden, layers),
        ("o_proj", hidden, heads * head_dim, layers),
        ("gate_up_proj", 2 * inter, hidden, layers),
        ("down_proj", hidden, inter, layers),
        ("lm_head", config["vocab_size"], hidden, 1),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--blas", nargs="+", default=["default", "cublaslt"])
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    config = preset_config(args.preset)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e12:.3f} TB/s; {args.preset} decode products, bf16")
    print(f"{'blas':>9} {'tokens':>6} {'product':>13} {'out x in':>14} {'us':>8} {'floor us':>8} {'of floor':>8}")
    for blas in args.blas:
        if blas != "default":
            torch.backends.cuda.preferred_blas_library(blas)
        for m in args.tokens:
            total = total_floor = 0.0
            for name, n, k, count in shapes(config):
                copies = max(1, min(count, (1 << 30) // (n * k * 2)))  # about 1 GiB of distinct weights
                weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                graph = torch.cuda.CUDAGraph()
                torch.nn.functional.linear(x, weights[0])
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    for w in weights:
                        torch.nn.functional.linear(x, w)
                seconds = median_seconds(graph.replay, device=device, repeats=20, warmup=3) / copies
                floor = (n * k + m * (n + k)) * 2 / bandwidth
                total += seconds * count
                total_floor += floor * count
                print(f"{blas:>9} {m:>6} {name:>13} {f'{n}x{k}':>14} {seconds * 1e6:>8.1f} {floor * 1e6:>8.1f} "
                      f"{floor / seconds:>8.2f}")
                del weights, graph
                torch.cuda.empty_cache()
            print(f"{blas:>9} {m:>6} {'all, per step':>13} {'':>14} {total * 1e6:>8.0f} {total_floor * 1e6:>8.0f} "
                  f"{total_floor / total:>8.2f}")
        torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
