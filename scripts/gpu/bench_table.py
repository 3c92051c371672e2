"""The closing table of scripts/gpu/bench.sh: every figure beside its ceiling, transformers and the
issue's target, read from the JSON files the run wrote.

    python scripts/gpu/bench_table.py OUT_DIR
"""

from __future__ import annotations

import glob
import json
import os
import sys


def read_lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def main(out: str) -> None:
    ceilings_path = os.path.join(out, "ceilings.json")
    if os.path.exists(ceilings_path):
        with open(ceilings_path) as f:
            c = json.load(f)
        print(f"\n{c['device']}: copy {c['copy_tb_s']:.3f} TB/s (read + write), "
              f"bf16 matmul {c['matmul_tflop_s']:.1f} TFLOP/s (n = {c['matmul_n']}, random data)")
    rows = [("model", "figure", "plait", "floor / ceiling", "fraction", "transformers", "vs HF", "target")]
    for path in sorted(glob.glob(os.path.join(out, "one_batch_*.jsonl"))):
        for r in read_lines(path):
            model = os.path.basename(r["model"])
            b, i, o = r["batch_size"], r["input_len"], r["output_len"]
            ce, hf = r.get("ceilings") or {}, r.get("vs_hf") or {}
            ms = 1000 * r["median_decode_latency_s"]
            mode = ("graphs" if r.get("cuda_graphs") else "eager") + ("+compile" if r.get("torch_compile") else "")
            kv_dtype = (r.get("memory") or {}).get("kv_dtype", "")
            if kv_dtype.startswith("float8"):
                mode += f", KV {kv_dtype}"
            if mode != "graphs":
                model = f"{model} ({mode})"
            if b == 1:
                rows.append((model, f"decode b1 ctx {i}: ms/token", f"{ms:.3f}",
                             num(ce.get("decode_floor_s") and 1000 * ce["decode_floor_s"], "{:.3f}"),
                             pct(ce.get("decode_fraction_of_floor")),
                             num(hf.get("hf_median_decode_latency_s") and 1000 * hf["hf_median_decode_latency_s"],
                                 "{:.3f}"),
                             num(hf.get("decode_speedup_vs_hf"), "{:.2f}x"), ">= 80% of floor" if i == 1024 else ""))
                sync = r.get("sync_median_decode_latency_s")
                if sync and ce.get("decode_floor_s"):
                    rows.append((model, "  same, each step read back before the next (sync loop)",
                                 f"{1000 * sync:.3f}", f"{1000 * ce['decode_floor_s']:.3f}",
                                 pct(ce["decode_floor_s"] / sync), "", "", ""))
                replay = r.get("decode_graph_replay_s")
                if replay and ce.get("decode_floor_s"):
                    rows.append((model, "  same, device time alone (graph replay)", f"{1000 * replay:.3f}",
                                 f"{1000 * ce['decode_floor_s']:.3f}", pct(ce["decode_floor_s"] / replay), "", "", ""))
                rows.append((model, f"prefill {i} tokens: TFLOP/s", num(ce.get("prefill_flop_per_s") and
                                                                        ce["prefill_flop_per_s"] / 1e12),
                             num(ce.get("matmul_flop_per_s") and ce["matmul_flop_per_s"] / 1e12),
                             pct(ce.get("prefill_fraction_of_matmul")),
                             num(hf.get("hf_prefill_latency_s") and i / hf["hf_prefill_latency_s"], "{:.0f} tok/s"),
                             num(hf.get("prefill_speedup_vs_hf"), "{:.2f}x"), ">= 50% of matmul" if i == 4096 else ""))
                rows.append((model, f"prefill {i} tokens: tok/s", f"{r['prefill_throughput_tok_s']:.0f}",
                             "", "", "", "", ""))
            else:
                rows.append((model, f"decode b{b} in {i} out {o}: tok/s",
                             f"{r['median_decode_throughput_tok_s']:.0f}",
                             num(ce.get("decode_floor_s") and b / ce["decode_floor_s"], "{:.0f}"),
                             pct(ce.get("decode_fraction_of_floor")), "", "",
                             "> 10,000 tok/s (H100)" if b == 128 else ""))
                rows.append((model, "  same, end to end (prefill + decode): tok/s",
                             f"{b * o / r['total_latency_s']:.0f}", "", "", "", "", ""))
    for r in read_lines(os.path.join(out, "gsp.jsonl")):
        model = os.path.basename(str((r.get("engine_options") or {}).get("model_path", "")))
        rows.append((model, f"shared-prefix {r['run_name']}: output tok/s", f"{r['output_throughput']:.0f}",
                     "", f"hit {pct(r['cache_hit_rate'])}", "", "", ""))
        rows.append((model, f"shared-prefix {r['run_name']}: total tok/s, duration",
                     f"{r['total_throughput']:.0f}", f"{r['duration_s']:.1f} s", "", "", "", ""))
    for r in read_lines(os.path.join(out, "serving.jsonl")):
        model = os.path.basename(str(r.get("model") or "plait serve"))
        hit = r.get("cache_hit_rate")
        rows.append((model, f"serving, {r['run_name']}: output tok/s", f"{r['output_throughput']:.0f}", "",
                     f"hit {pct(hit)}" if hit is not None else "", "", "", ""))
        rows.append((model, "  median TTFT / TPOT ms; failed", f"{r['ttft_ms']['median']:.1f} / "
                     f"{r['tpot_ms']['median']:.2f}", "", f"{r['failed']} failed", "", "", ""))
    widths = [max(len(str(row[k])) for row in rows) for k in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    failures = os.path.join(out, "failures.log")
    if os.path.exists(failures):
        with open(failures) as f:
            print("\nFAILED STEPS:\n" + f.read())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench_results/gpu")
