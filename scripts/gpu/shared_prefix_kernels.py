"""Decode attention of one layer over generated-shared-prefix batches: the plain split-KV path (every
request reads its whole row) against the shared-prefix path (each group's prefix read once per chunk of
members, then each request's own part, then the merge). Llama-3.1-8B heads (32 query, 8 KV, 128), bf16.

Prints one line per batch shape (time per call, bandwidth over the bytes each path must read, the
speed-up, the relative difference of the two outputs) and writes them as JSON lines.

    python3 scripts/gpu/shared_prefix_kernels.py [--output shared_prefix_kernels.jsonl]
"""

from __future__ import annotations

import argparse
import json

import torch

from plait.runtime.attention.triton_ops import (
    SHARED_STEP_BLOCK_N,
    SHARED_STEP_SPLITS,
    decode_attention,
    decode_config,
    shared_prefix_plan,
    smem_bytes,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
# (groups, members per group, shared prefix, each request's own tokens)
SHAPES = [(32, 16, 2048, 200), (64, 8, 2048, 200), (8, 16, 2048, 200), (32, 16, 2048, 20)]


def time_us(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000


def measure(groups: int, members: int, prefix: int, own: int) -> dict:
    device = torch.device("cuda")
    batch = groups * members
    num_slots = groups * prefix + batch * own + 10
    k = torch.randn(num_slots + 1, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    req_to_token = torch.zeros(batch + 1, prefix + own + 8, dtype=torch.int32, device=device)
    perm = torch.randperm(num_slots, device=device) + 1
    taken, rows, plan_groups = 0, [], []
    for g in range(groups):
        shared = perm[taken : taken + prefix]
        taken += prefix
        positions = []
        for m in range(members):
            i = g * members + m
            req_to_token[i + 1, :prefix] = shared
            req_to_token[i + 1, prefix : prefix + own] = perm[taken : taken + own]
            taken += own
            rows.append(i + 1)
            positions.append(i)
        plan_groups.append((positions, prefix))
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
    rows_t = torch.tensor(rows, device=device)
    seq_lens = torch.full((batch,), prefix + own, device=device)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    cfg = decode_config(batch, NUM_KV_HEADS, HEAD_DIM, 2, num_sms, smem_bytes(device))
    plan = shared_prefix_plan(plan_groups, rows, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                              num_sms=num_sms, device=device)
    scale = HEAD_DIM**-0.5

    def plain():
        return decode_attention(q, k, v, req_to_token, rows_t, seq_lens, sm_scale=scale, max_splits=cfg.max_splits,
                                block_n=cfg.block_n, num_stages=cfg.num_stages)

    def shared():
        return decode_attention(q, k, v, req_to_token, rows_t, seq_lens, sm_scale=scale, max_splits=SHARED_STEP_SPLITS,
                                block_n=SHARED_STEP_BLOCK_N, shared=plan)

    a, b = plain().float(), shared().float()
    token_bytes = NUM_KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
    plain_bytes = batch * (prefix + own) * token_bytes
    shared_bytes = (groups * prefix + batch * own) * token_bytes
    t_plain, t_shared = time_us(plain), time_us(shared)
    return {
        "groups": groups, "members": members, "prefix": prefix, "own": own,
        "plain_us": t_plain, "shared_us": t_shared, "speedup": t_plain / t_shared,
        "plain_tb_s": plain_bytes / t_plain / 1e6, "shared_tb_s": shared_bytes / t_shared / 1e6,
        "prefix_splits": plan.num_splits, "rel_diff": float((a - b).norm() / a.norm()),
        "gpu": torch.cuda.get_device_name(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="append one JSON line per shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    for shape in SHAPES:
        r = measure(*shape)
        print(f"groups {r['groups']} x {r['members']}, prefix {r['prefix']}, own {r['own']}: "
              f"plain {r['plain_us']:.1f} us ({r['plain_tb_s']:.2f} TB/s), shared {r['shared_us']:.1f} us "
              f"({r['shared_tb_s']:.2f} TB/s of its bytes), speedup {r['speedup']:.2f}x, "
              f"prefix splits {r['prefix_splits']}, rel diff {r['rel_diff']:.2e}")
        if args.output:
            with open(args.output, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
