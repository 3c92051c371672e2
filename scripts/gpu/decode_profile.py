"""Where a decode step's device time goes: eager steps of Llama-3.1-8B shapes (dummy weights) under
the CUDA profiler, kernels grouped by name, against the floor (weights read once plus the batch's KV).

    python3 scripts/gpu/decode_profile.py [--model llama-3.1-8b] [--context 1024] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from plait.bench.ceilings import copy_bandwidth
from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch
from plait.runtime.executor.model_runner import ModelRunner


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    runner = ModelRunner(
        ModelConfig(model_path=args.model, load_format="dummy", dtype="bfloat16", device="cuda",
                    context_length=4096, disable_cuda_graph=True),
        MemoryConfig(max_total_tokens=args.batch * (args.context + 32), max_running_requests=args.batch + 1),
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    embed = runner.model.model.embed_tokens.weight if hasattr(runner.model, "model") else None
    if embed is not None and embed.data_ptr() != runner.model.lm_head_weight.data_ptr():
        weight_bytes -= embed.numel() * embed.element_size()  # the embedding reads one row per token
    bandwidth = copy_bandwidth(torch.device("cuda"))
    common = {"req_to_token_pool": runner.req_to_token_pool, "kv_pool": runner.kv_pool,
              "attn_backend": runner.attn_backend}
    rows = [runner.req_to_token_pool.alloc() for _ in range(args.batch)]
    tokens = []
    for row in rows:
        prompt = torch.randint(100, 30000, (args.context,)).tolist()
        batch = make_extend_batch(req_pool_indices=[row], prefix_lens=[0], new_token_ids=[prompt],
                                  out_cache_loc=runner.allocator.alloc(args.context), **common)
        tokens.append(int(runner.forward(batch).next_token_logits.argmax(-1)))
    seq_len = args.context
    kv_bytes = args.batch * (args.context + 8) * runner.kv_bytes_per_token

    def step():
        nonlocal seq_len, tokens
        seq_len += 1
        b = make_decode_batch(req_pool_indices=rows, seq_lens=[seq_len] * len(rows), last_token_ids=tokens,
                              out_cache_loc=runner.allocator.alloc(len(rows)), **common)
        return runner.forward(b).next_token_logits

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            kernels[event.key] = (device_us / args.steps, event.count // args.steps)
    total = sum(us for us, _ in kernels.values())
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    print(f"batch {args.batch}, context {args.context}: weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} GB, "
          f"copy bandwidth {bandwidth / 1e12:.3f} TB/s, floor {floor_ms:.3f} ms")
    print(f"eager decode step: {total / 1e3:.3f} ms of kernel time, {sum(n for _, n in kernels.values())} kernels")
    for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {us / 1e3:8.3f} ms  x{n:4d}  {name[:110]}")
    json.dump({"floor_ms": floor_ms, "kernel_ms": total / 1e3, "kernels": kernels}, sys.stderr)


if __name__ == "__main__":
    main()
