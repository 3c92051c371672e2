#!/usr/bin/env bash
# The closing GPU round: every GPU test (tests/gpu), then the benchmarks (bench.sh).
# Logs and JSON are bundled into $OUT/final.tgz (the device returns few files); the table prints last.
#   OUT=results/gpu bash scripts/gpu/final.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_results}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
timeout 240 python3 -m pytest tests/gpu -q -p no:cacheprovider -rs 2>&1 | tee "$WORK/tests_gpu.log" | tail -15
OUT="$WORK/bench" bash scripts/gpu/bench.sh > "$WORK/bench.log" 2>&1
grep -v "Capturing CUDA graphs" "$WORK/bench.log" | grep -E "^(===|memory:|!!!)" | cut -c1-300
cat "$WORK/bench/table.txt"
mkdir -p "$OUT" && tar czf "$OUT/final.tgz" -C "$WORK" .
