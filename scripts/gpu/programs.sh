#!/usr/bin/env bash
# The paper's workloads (python -m plait.bench.programs) on one GPU, through `plait serve` on a
# dummy-weight preset (default Llama-3.1-8B shapes, bf16) with a synthetic tokenizer of the preset's
# vocabulary size (scripts/gpu/make_tokenizer.py; the suite draws its text from that tokenizer's words,
# --vocabulary synthetic). Random weights write meaningless text, so only the workloads whose calls do
# not depend on what the model writes run: all but json_decode (its regexes decide where each field
# ends). At the paper's sizes, batch and latency with the prefix cache on, then batch on a server
# started with --disable-radix-cache. JSON lines in $OUT/programs.jsonl, server logs beside.
# Run from the repository root with plait importable.
#
#   OUT=results/gpu bash scripts/gpu/programs.sh
#   QUICK=1 MODEL=llama-3.2-1b bash scripts/gpu/programs.sh    # a smoke run
#
# Parts of a sitting: ON_RUNS lists the runs with the cache on as MODES:WORKLOADS words (default
# "batch,latency:all"; "-" skips them), OFF_WORKLOADS the workloads without it (default all; "-" skips
# the no-cache server). SUITE_TIMEOUT bounds each cache-on run, NO_CACHE_TIMEOUT the no-cache one, and
# DEADLINE (seconds since the epoch) every run: each stops 20 s before it. A results file already in
# $OUT (--skip-done) makes a rerun finish what an interrupted one left.
#
#   ON_RUNS="batch:llm_judge,dspy_rag latency:all" OFF_WORKLOADS=react bash scripts/gpu/programs.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-3.1-8b}
PORT=${PORT:-30000}
SIZE=paper
[ "${QUICK:-0}" = 1 ] && SIZE=quick
EXCLUDE=${EXCLUDE:-json_decode}
TOK=$(mktemp -d)
$PY scripts/gpu/make_tokenizer.py "$TOK" --preset "$MODEL" || exit 1

with_server() {  # with_server NAME FLAGS...: start plait serve, wait for /health; SERVER is its pid
  local name=$1
  shift
  echo "=== server $name: $* ($(date +%T))"
  $PY -m plait.launch_server --model-path "$MODEL" --load-format dummy --dtype bfloat16 --context-length 8192 \
    --tokenizer-path "$TOK" --port "$PORT" --served-model-name "$MODEL" "$@" > "$OUT/serve_$name.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do
    curl -sf "localhost:$PORT/health" > /dev/null && return 0
    kill -0 $SERVER 2> /dev/null || break
    sleep 1
  done
  echo "!!! server $name did not start"
  tail -20 "$OUT/serve_$name.log"
  kill $SERVER 2> /dev/null
  return 1
}

stop_server() {
  kill $SERVER 2> /dev/null
  wait $SERVER 2> /dev/null
}

suite() {  # suite TIMEOUT_S ARGS...: the programs suite against the running server
  local limit=$1
  shift
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - $(date +%s) - 20))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -gt 10 ] || { echo "!!! no time left for suite $*"; return; }
  fi
  echo "=== suite $* ($(date +%T))"
  timeout "$limit" $PY -m plait.bench.programs --backend endpoint --base-url "http://127.0.0.1:$PORT" \
    --size "$SIZE" --exclude "$EXCLUDE" --modes "${MODES:-batch,latency}" --vocabulary synthetic --label "plait-$MODEL" \
    --result-file "$OUT/programs.jsonl" --skip-done "$@" 2>&1 | grep -v "^$"
  [ "${PIPESTATUS[0]}" = 0 ] || echo "!!! suite $* failed"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  cat COMMIT 2> /dev/null || git rev-parse --short HEAD 2> /dev/null || true
  date -Iseconds
} 2>&1 | tee "$OUT/env.log"

ON_RUNS=${ON_RUNS:-"${MODES:-batch,latency}:all"}
OFF_WORKLOADS=${OFF_WORKLOADS:-all}
if [ "$ON_RUNS" != - ] && with_server default; then
  for run in $ON_RUNS; do
    suite "${SUITE_TIMEOUT:-400}" --modes "${run%%:*}" --workloads "${run#*:}"
  done
  stop_server
fi
if [ "$OFF_WORKLOADS" != - ] && with_server no_cache --disable-radix-cache; then
  suite "${NO_CACHE_TIMEOUT:-300}" --server-ablation no-cache --modes batch --workloads "$OFF_WORKLOADS"
  stop_server
fi
