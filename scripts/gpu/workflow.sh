#!/usr/bin/env bash
# The agent-workflow benchmark (python -m plait.bench.workflow) on one GPU: 8B shapes (default the
# Llama-3.1-8B preset), random weights, bf16, a synthetic tokenizer of the preset's vocabulary size
# (scripts/gpu/make_tokenizer.py). Three cache setups, each on a fresh in-process engine:
# (a) LRU, no tiers; (b) host tier + LRU; (c) host tier + workflow-aware eviction + prefetch.
#   1. 8 agents x 4,096-token prompts, one workflow then 4 concurrent ones (KV pool of 4 and 5.5
#      agents' steps), with the multi-turn chat workload (8 sessions, 1,024-token system prompt,
#      512-token user turns, a pool of 8,192 tokens);
#   2. 16 agents, 8 concurrent workflows (KV pool of 9.5 agents' steps), no chat.
# T1 and T2 bound the two runs in seconds (0 skips one), DEADLINE (seconds since the epoch) both;
# WORKFLOWS sets the first run's concurrent workflows, SKIP_CHAT=1 leaves its chat workload out,
# HICACHE_RATIO sizes the host tier against the pool (default 2; 1.5 leaves the host short of the agents).
# JSON in $OUT/workflow_*.json, the printed tables in $OUT/workflow.log.
# Run from the repository root with plait importable.
#
#   OUT=results/gpu bash scripts/gpu/workflow.sh
#   QUICK=1 MODEL=llama-3.2-1b bash scripts/gpu/workflow.sh    # a smoke run
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-3.1-8b}
PROMPT=${PROMPT:-4096}
ROUNDS=${ROUNDS:-3}
CHAT=(--chat-sessions 8 --chat-turns 4 --chat-system-len 1024 --chat-turn-len 512 --chat-pool 8192)
[ "${SKIP_CHAT:-0}" = 1 ] && CHAT=(--skip-chat)
if [ "${QUICK:-0}" = 1 ]; then
  PROMPT=512 ROUNDS=1
  CHAT=(--chat-sessions 3 --chat-turns 2 --chat-system-len 128 --chat-turn-len 64 --chat-pool 600)
fi
TOK=$(mktemp -d)
$PY scripts/gpu/make_tokenizer.py "$TOK" --preset "$MODEL" > /dev/null || exit 1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  cat COMMIT 2> /dev/null || git rev-parse --short HEAD 2> /dev/null || true
  date -Iseconds
} 2>&1 | tee "$OUT/env_workflow.log"

bench() {  # bench TIMEOUT_S NAME ARGS...
  local limit=$1 name=$2
  shift 2
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - $(date +%s) - 10))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -gt 30 ] || { echo "!!! no time left for workflow $name"; return; }
  fi
  echo "=== workflow $name: $* ($(date +%T))"
  timeout "$limit" $PY -m plait.bench.workflow --model-path "$MODEL" --load-format dummy --dtype bfloat16 \
    --tokenizer-path "$TOK" --prompt-len "$PROMPT" --rounds "$ROUNDS" --hicache-ratio "${HICACHE_RATIO:-2}" --output-file "$OUT/workflow_$name.json" "$@" \
    -- --context-length 8192 --cuda-graph-max-bs 16 ${ENGINE_ARGS:-}
  [ $? = 0 ] || echo "!!! workflow $name failed or timed out"
}

{
  [ "${T1:-330}" = 0 ] || bench "${T1:-330}" 8agents --num-agents 8 --workflows "${WORKFLOWS:-1,4}" "${CHAT[@]}"
  [ "${QUICK:-0}" = 1 ] || [ "${T2:-200}" = 0 ] || bench "${T2:-200}" 16agents --num-agents 16 --workflows 8 --skip-chat
} 2>&1 | tee -a "$OUT/workflow.log"
