#!/usr/bin/env bash
# One device round for overlap scheduling: the GPU test (outputs identical with
# overlap on and off; SKIP_TESTS=1 skips it), where the overlapped loop still waits for the device
# (sync debug mode), and offline throughput with overlap on and off on a small model, dummy weights.
#   OUT=/tmp/out bash scripts/gpu/overlap_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_results/overlap}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.log"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 $PY -m pytest tests/gpu/test_overlap_schedule_gpu.py -q -p no:cacheprovider -rs -x 2>&1 \
    | tee "$OUT/tests.log" | tail -30
fi
timeout 90 $PY scripts/gpu/overlap_syncs.py 2>&1 | grep -v "Capturing" | tee "$OUT/syncs.log" | tail -30
# Alternating, twice: the first process on a machine also pays for Triton compilations the later
# ones find in the disk cache.
for flag in --disable-overlap-schedule "" --disable-overlap-schedule ""; do
  timeout 60 $PY -m plait.bench.offline_throughput --model-path llama-3.2-1b --load-format dummy --dtype bfloat16 \
    --context-length 2048 --max-running-requests 128 --cuda-graph-max-bs 128 --dataset-name random \
    --num-prompts 256 --random-input-len 256 --random-output-len 128 --random-range-ratio 0.5 \
    --warmup-requests 16 --run-name "overlap ${flag:-on}" $flag \
    --result-file "$OUT/throughput.jsonl" 2>&1 | grep -v "Capturing" | tee -a "$OUT/throughput.log" | tail -12
done
