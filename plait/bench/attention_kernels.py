"""Timing of the Triton attention kernels on Llama-3.1-8B attention shapes, against the hardware.

    python -m plait.bench.attention_kernels [--sweep] [--prefill-model llama-3.1-8b] [--output out.jsonl]

- Decode (batch 1..256, context 1024 and 4096; 32 query heads, 8 KV heads, head_dim 128, bf16):
  the floor is the KV bytes the step must read (plus queries, outputs and slot ids) over the
  measured copy bandwidth. Each figure times a CUDA graph of the kernels over enough layers' KV
  (up to 32, as a model step has) that the data is far past the L2 cache.
- Extend (4096 new tokens in several batch layouts): causal attention FLOPs (4 · heads · head_dim
  per visible query-key pair) over the measured bf16 matrix-product rate; PyTorch's SDPA (flash)
  on the same single-request prefill is printed beside it.
- With `--prefill-model`: one prefill of 4096 tokens through the whole model (dummy weights), with
  the Triton and the torch-native backends: matrix-product FLOPs plus attention FLOPs over the
  matrix-product ceiling (the issue's target: at least half of it).
- `--sweep` also times each kernel's alternative block configurations.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch

from plait.bench.ceilings import median_seconds

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16


def _bench_graph(fn: Callable[[], Any], repeats: int = 50) -> float:
    """Median seconds of one call, replayed as a CUDA graph (launch gaps excluded)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def _pools(num_slots: int, num_layers: int, dtype: torch.dtype = DTYPE) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (num_slots + 1, NUM_KV_HEADS, HEAD_DIM)
    ks = [torch.randn(shape, device="cuda").to(dtype) for _ in range(num_layers)]
    vs = [torch.randn(shape, device="cuda").to(dtype) for _ in range(num_layers)]
    return ks, vs


def _req_to_token(seq_lens: list[int], num_slots: int) -> torch.Tensor:
    """Rows 1..n over a random permutation of the slots (the allocator's order after churn)."""
    table = torch.zeros((len(seq_lens) + 1, max(seq_lens)), dtype=torch.int64, device="cuda")
    slots = torch.randperm(num_slots, device="cuda") + 1
    offset = 0
    for i, n in enumerate(seq_lens):
        table[i + 1, :n] = slots[offset : offset + n]
        offset += n
    return table


def bench_decode(ceil_copy: float, *, sweep: bool, kv_dtype: torch.dtype = DTYPE) -> list[dict[str, Any]]:
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    print(f"\n== decode: {NUM_HEADS} q heads, {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, bf16 queries, "
          f"KV {str(kv_dtype).replace('torch.', '')}; per layer ==")
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'time us':>8} {'floor us':>8} {'GB/s':>7} {'of floor':>8}  config")
    for ctx in (1024, 4096):
        for bs in (1, 8, 32, 64, 128, 256):
            results += _decode_case(bs, ctx, ceil_copy, num_sms, sweep=sweep, kv_dtype=kv_dtype)
            torch.cuda.empty_cache()
    return results


def _decode_case(
    bs: int, ctx: int, ceil_copy: float, num_sms: int, *, sweep: bool, kv_dtype: torch.dtype = DTYPE
) -> list[dict[str, Any]]:
    from plait.runtime.attention.triton_ops import (
        decode_attention,
        decode_config,
        smem_bytes,
    )

    seq_lens = [ctx] * bs
    num_slots = bs * ctx
    kv_bytes = num_slots * NUM_KV_HEADS * HEAD_DIM * 2 * kv_dtype.itemsize
    num_layers = max(1, min(32, math.ceil((512 << 20) / kv_bytes)))
    ks, vs = _pools(num_slots, num_layers, kv_dtype)
    table = _req_to_token(seq_lens, num_slots)
    rows = torch.arange(1, bs + 1, device="cuda")
    lens = torch.tensor(seq_lens, device="cuda")
    q = torch.randn(bs, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    # KV, plus per KV head the slot ids, plus q and out.
    step_bytes = kv_bytes + num_slots * 8 * NUM_KV_HEADS + 2 * q.numel() * 2
    floor = step_bytes / ceil_copy
    default_splits, block_n, stages = decode_config(bs, NUM_KV_HEADS, HEAD_DIM, kv_dtype.itemsize, num_sms,
                                                    smem_bytes(q.device))
    configs = [{"max_splits": default_splits, "block_n": block_n, "num_warps": 4, "num_stages": stages}]
    if sweep:
        for splits in sorted({max(1, default_splits // 2), min(32, default_splits * 2)} - {default_splits}):
            configs.append({"max_splits": splits, "block_n": block_n, "num_warps": 4, "num_stages": stages})
        alternatives = [(64, 4, 2), (128, 4, 2), (64, 4, 3), (64, 8, 2), (64, 4, 4), (32, 4, 3), (128, 8, 3)]
        if kv_dtype.itemsize == 1:  # half the bytes per block: larger blocks and more warps are candidates
            alternatives += [(128, 4, 3), (256, 4, 2), (256, 8, 2), (128, 8, 2)]
        configs += [{"max_splits": default_splits, "block_n": bn, "num_warps": w, "num_stages": s}
                    for bn, w, s in alternatives if (bn, w, s) != (block_n, 4, stages)]
    results = []
    for cfg in configs:
        partial_out = torch.empty((bs, NUM_HEADS, cfg["max_splits"], HEAD_DIM), device="cuda", dtype=torch.float32)
        partial_lse = torch.empty((bs, NUM_HEADS, cfg["max_splits"]), device="cuda", dtype=torch.float32)

        def step(cfg=cfg, partial_out=partial_out, partial_lse=partial_lse):
            for k, v in zip(ks, vs):
                decode_attention(q, k, v, table, rows, lens, sm_scale=HEAD_DIM**-0.5, out=out,
                                 partial_out=partial_out, partial_lse=partial_lse, **cfg)

        seconds = _bench_graph(step) / num_layers
        rec = dict(kind="decode", kv_dtype=str(kv_dtype).replace("torch.", ""), batch=bs, ctx=ctx, seconds=seconds, floor_s=floor,
                   gb_s=step_bytes / seconds / 1e9, fraction_of_floor=floor / seconds, layers_timed=num_layers, **cfg)
        results.append(rec)
        print(f"{bs:>5} {ctx:>5} {cfg['max_splits']:>6} {seconds * 1e6:>8.1f} {floor * 1e6:>8.1f} "
              f"{rec['gb_s']:>7.0f} {rec['fraction_of_floor']:>8.2f}  bn{cfg['block_n']} w{cfg['num_warps']} "
              f"s{cfg['num_stages']}")
    return results


def _extend_flops(prefix_lens: list[int], extend_lens: list[int]) -> float:
    pairs = sum(e * p + e * (e + 1) / 2 for p, e in zip(prefix_lens, extend_lens))
    return 4 * NUM_HEADS * HEAD_DIM * pairs


_EXTEND_LAYOUTS = {
    "1 x 4096": ([0], [4096]),
    "4 x 1024": ([0] * 4, [1024] * 4),
    "prefix 3072 + 1024": ([3072], [1024]),
    "8 x (512 cached + 512)": ([512] * 8, [512] * 8),
    "1 x 16384": ([0], [16384]),
}


def bench_extend(ceil_matmul: float, *, sweep: bool) -> list[dict[str, Any]]:
    results = []
    print(f"\n== extend: {NUM_HEADS} q heads, {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, bf16; one layer ==")
    print(f"{'layout':>24} {'time us':>9} {'TFLOP/s':>8} {'of matmul':>9}  config")
    for name, (prefix_lens, extend_lens) in _EXTEND_LAYOUTS.items():
        results += _extend_case(name, prefix_lens, extend_lens, ceil_matmul, sweep=sweep)
        torch.cuda.empty_cache()
    return results


def _extend_case(
    name: str, prefix_lens: list[int], extend_lens: list[int], ceil_matmul: float, *, sweep: bool
) -> list[dict[str, Any]]:
    import torch.nn.functional as F

    from plait.runtime.attention.triton_ops import extend_attention
    from plait.runtime.attention.triton_ops.extend import _extend_config

    num_tokens = sum(extend_lens)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    num_slots = sum(seq_lens)
    ks, vs = _pools(num_slots, 1)
    table = _req_to_token(seq_lens, num_slots)
    rows = torch.arange(1, len(seq_lens) + 1, device="cuda")
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    prefix_t = torch.tensor(prefix_lens, dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, *torch.tensor(extend_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    flops = _extend_flops(prefix_lens, extend_lens)
    configs = [_extend_config(HEAD_DIM, DTYPE)]
    if sweep:
        configs += [c for c in ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                                (64, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 2)) if c != configs[0]]
    results = []
    for cfg in configs:
        def call(cfg=cfg):
            extend_attention(q, k, v, ks[0], vs[0], table, rows, prefix_t, indptr,
                             max_extend_len=max(extend_lens), sm_scale=HEAD_DIM**-0.5, out=out, config=cfg)
        try:
            seconds = _bench_graph(call, repeats=20)
        except Exception as exc:  # noqa: BLE001 - a config over the shared-memory limit fails to compile
            print(f"{name:>24}  config {cfg} failed: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        rec = {"kind": "extend", "layout": name, "seconds": seconds, "tflop_s": flops / seconds / 1e12,
                   "fraction_of_matmul": flops / seconds / ceil_matmul, "config": list(cfg)}
        results.append(rec)
        print(f"{name:>24} {seconds * 1e6:>9.1f} {rec['tflop_s']:>8.1f} {rec['fraction_of_matmul']:>9.2f}  {cfg}")
    if len(extend_lens) == 1 and prefix_lens == [0]:
        n = extend_lens[0]
        group = NUM_HEADS // NUM_KV_HEADS
        qs = q.view(1, n, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        kr = k.repeat_interleave(group, 1).view(1, n, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        vr = v.repeat_interleave(group, 1).view(1, n, NUM_HEADS, HEAD_DIM).transpose(1, 2)
        seconds = _bench_graph(lambda: F.scaled_dot_product_attention(qs, kr, vr, is_causal=True), repeats=20)
        rec = {"kind": "extend_sdpa", "layout": name, "seconds": seconds, "tflop_s": flops / seconds / 1e12,
                   "fraction_of_matmul": flops / seconds / ceil_matmul}
        results.append(rec)
        print(f"{'torch SDPA ' + name:>24} {seconds * 1e6:>9.1f} {rec['tflop_s']:>8.1f} "
              f"{rec['fraction_of_matmul']:>9.2f}  (contiguous, heads repeated)")
    return results


@torch.inference_mode()
def bench_prefill_model(preset: str, ceil_matmul: float, num_tokens: int = 4096) -> list[dict[str, Any]]:
    """One prefill of `num_tokens` through the whole model, per attention backend."""
    from plait.runtime.attention.base import create_attention_backend
    from plait.runtime.executor.forward_batch import make_extend_batch
    from plait.runtime.memory.kv_pool import KVPool, ReqToTokenPool
    from plait.runtime.model_loader.dummy import preset_config
    from plait.runtime.models.registry import get_model_class

    config = preset_config(preset)
    with torch.device("meta"):
        model = get_model_class(config)(config).to(DTYPE)
    model = model.to_empty(device="cuda")
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02)
    arch = model.arch
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    # Matrix products (the LM head on the last token only) plus causal attention.
    flops = 2 * matmul_params * num_tokens + 2 * arch.hidden_size * arch.vocab_size
    flops += arch.num_layers * 4 * arch.num_heads * arch.head_dim * num_tokens * (num_tokens + 1) / 2
    kv_pool = KVPool(num_slots=num_tokens + 8, num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads,
                     head_dim=arch.head_dim, dtype=DTYPE, device="cuda")
    req_pool = ReqToTokenPool(2, num_tokens + 8, "cuda")
    ids = torch.randint(0, arch.vocab_size, (num_tokens,)).tolist()
    results = []
    print(f"\n== prefill of {num_tokens} tokens through {preset} (dummy weights, bf16) ==")
    for backend_name in ("triton", "torch_native"):
        backend = create_attention_backend(backend_name, device=torch.device("cuda"))

        def prefill(backend=backend):
            batch = make_extend_batch(
                req_pool_indices=[1], prefix_lens=[0], new_token_ids=[ids],
                out_cache_loc=torch.arange(1, num_tokens + 1, device="cuda"), req_to_token_pool=req_pool,
                kv_pool=kv_pool, attn_backend=backend,
            )
            backend.init_forward_metadata(batch)
            hidden = model(batch)
            return model.compute_logits(hidden[-1:])

        seconds = median_seconds(prefill, device=torch.device("cuda"), repeats=10, warmup=3)
        rec = {"kind": "prefill_model", "model": preset, "backend": backend_name, "tokens": num_tokens, "seconds": seconds,
                   "tokens_per_s": num_tokens / seconds, "tflop_s": flops / seconds / 1e12,
                   "fraction_of_matmul": flops / seconds / ceil_matmul}
        results.append(rec)
        print(f"{backend_name:>13}: {seconds * 1e3:8.1f} ms  {rec['tokens_per_s']:9.0f} tok/s  "
              f"{rec['tflop_s']:6.1f} TFLOP/s = {rec['fraction_of_matmul']:.2f} of the matmul ceiling")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time alternative block configurations")
    parser.add_argument("--prefill-model", default=None, help="a dummy preset, e.g. llama-3.1-8b")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--kv-dtype", choices=("bfloat16", "fp8_e5m2", "fp8_e4m3"), default="bfloat16",
                        help="the decode kernels' KV pool type (queries stay bf16)")
    parser.add_argument("--skip-extend", action="store_true")
    parser.add_argument("--output", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")

    from plait.bench.ceilings import copy_bandwidth, matmul_rate

    torch.manual_seed(0)
    ceil_copy, ceil_matmul = copy_bandwidth(torch.device("cuda")), matmul_rate(torch.device("cuda"))
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: copy {ceil_copy / 1e12:.2f} TB/s (read + write), bf16 matmul {ceil_matmul / 1e12:.0f} TFLOP/s")
    results: list[dict[str, Any]] = [{"kind": "ceilings", "gpu": gpu, "copy_bytes_per_s": ceil_copy,
                                          "matmul_flop_per_s": ceil_matmul}]
    if not args.skip_decode:
        kv_dtype = {"bfloat16": torch.bfloat16, "fp8_e5m2": torch.float8_e5m2,
                    "fp8_e4m3": torch.float8_e4m3fn}[args.kv_dtype]
        results += bench_decode(ceil_copy, sweep=args.sweep, kv_dtype=kv_dtype)
    if not args.skip_extend:
        results += bench_extend(ceil_matmul, sweep=args.sweep)
    if args.prefill_model:
        results += bench_prefill_model(args.prefill_model, ceil_matmul)
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "a") as f:
            f.writelines(json.dumps({"gpu": gpu, **rec}) + "\n" for rec in results)


if __name__ == "__main__":
    main()
