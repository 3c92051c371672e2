#!/usr/bin/env bash
# One device round for the CUDA-graph work: the GPU tests, then the benchmark script's smoke run.
# Everything the round wrote is bundled into $OUT/graphs_check.tgz (the device returns few files).
#   OUT=results/gpu bash scripts/gpu/graphs_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_results}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest tests/gpu -q -p no:cacheprovider -rs 2>&1 | tee "$WORK/tests_gpu.log" | tail -40
QUICK=1 OUT="$WORK/quick" bash scripts/gpu/bench.sh > "$WORK/quick_bench.log" 2>&1
tail -60 "$WORK/quick_bench.log"
mkdir -p "$OUT" && tar czf "$OUT/graphs_check.tgz" -C "$WORK" .
