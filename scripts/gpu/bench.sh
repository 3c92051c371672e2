#!/usr/bin/env bash
# The GPU benchmarks of docs/performance-gpu.md, in one run on one GPU:
#   1. the two hardware ceilings (device-to-device copy bandwidth, bf16 matrix-product rate);
#   2. per model (dummy weights, bf16): Hugging Face transformers.generate, then plait.bench.one_batch
#      on the same shapes -- decode at batch 1 (input 1024), prefill of 4096 tokens, and for the 8B
#      decode throughput at batch 32, 64, 128, 256 (input 1024, output 256) -- each figure as a
#      fraction of its ceiling and as a ratio to transformers;
#   3. the generated-shared-prefix workload (64 groups x 16 prompts, system prompt 2048, question
#      128, output 256) through plait.bench.offline_throughput, prefix cache on vs off;
#   4. a table of everything (scripts/gpu/bench_table.py).
# JSON lines and logs go to $OUT (default bench_results/gpu). Run from the repository root with
# plait importable (PYTHONPATH=$PWD). A failing step is logged and the rest still run.
#
#   OUT=results/gpu bash scripts/gpu/bench.sh
#   QUICK=1 bash scripts/gpu/bench.sh          # a smoke run: the small model, short lengths
#   MODELS="llama-3.1-8b" SKIP_GSP=1 bash scripts/gpu/bench.sh
#   VARIANTS=1 bash scripts/gpu/bench.sh       # also the 8B at batch 1 without graphs and with torch.compile
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BIG=llama-3.1-8b

if [ "${QUICK:-0}" = 1 ]; then
  MODELS=${MODELS:-llama-3.2-1b}
  SHAPES="1x1024x32 1x4096x4"
  SWEEP="32x512x32"
  GSP=(--gsp-num-groups 8 --gsp-prompts-per-group 4 --gsp-system-prompt-len 512 --gsp-question-len 64 --gsp-output-len 32)
  GSP_MODEL=${GSP_MODEL:-llama-3.2-1b}
else
  MODELS=${MODELS:-"$BIG llama-3.2-1b"}
  SHAPES="1x1024x128 1x4096x8"
  SWEEP="32x1024x256 64x1024x256 128x1024x256 256x1024x256"
  GSP=(--gsp-num-groups 64 --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048 --gsp-question-len 128 --gsp-output-len 256)
  GSP_MODEL=${GSP_MODEL:-$BIG}
fi

# step NAME TIMEOUT_S CMD...: run, tee its output to $OUT/NAME.log, keep going on failure.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T)): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "!!! $name failed with exit code $rc" | tee -a "$OUT/failures.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
  git rev-parse --short HEAD 2>/dev/null || true
  date -Iseconds
} 2>&1 | tee "$OUT/env.log"

step ceilings 120 $PY -m plait.bench.ceilings --output "$OUT/ceilings.json"

for model in $MODELS; do
  shapes=$SHAPES
  [ "$model" = "$BIG" ] || [ "${QUICK:-0}" = 1 ] && shapes="$SHAPES $SWEEP"
  step "hf_$model" 300 $PY -m plait.bench.hf_baseline --model-path "$model" --load-format dummy --device cuda \
    --dtype bfloat16 --shapes $SHAPES --warmup 16 --result-file "$OUT/hf_$model.jsonl"
  # The batch-1 shapes also time the synchronous loop (--decode-loop both); the sweep runs overlapped
  # only, as the server does.
  step "one_batch_$model" 400 $PY -m plait.bench.one_batch --model-path "$model" --load-format dummy \
    --dtype bfloat16 --context-length 8192 --shapes $SHAPES --prefill-chunk-tokens 16384 --warmup 4 \
    --decode-loop both --ceilings "$OUT/ceilings.json" --baseline "$OUT/hf_$model.jsonl" \
    --result-file "$OUT/one_batch_$model.jsonl"
  if [ "$shapes" != "$SHAPES" ]; then
    step "one_batch_sweep_$model" 400 $PY -m plait.bench.one_batch --model-path "$model" --load-format dummy \
      --dtype bfloat16 --context-length 8192 --shapes $SWEEP --prefill-chunk-tokens 16384 --warmup 4 \
      --ceilings "$OUT/ceilings.json" --result-file "$OUT/one_batch_sweep_$model.jsonl"
    # The same sweep with an 8-bit KV pool (--kv-cache-dtype fp8_e5m2): half the KV bytes per step.
    step "one_batch_sweep_fp8kv_$model" 400 $PY -m plait.bench.one_batch --model-path "$model" --load-format dummy \
      --dtype bfloat16 --kv-cache-dtype fp8_e5m2 --context-length 8192 --shapes $SWEEP --prefill-chunk-tokens 16384 \
      --warmup 4 --ceilings "$OUT/ceilings.json" --result-file "$OUT/one_batch_sweep_fp8kv_$model.jsonl"
  fi
done

# Decode at batch 1 of the big model without CUDA graphs, and with torch.compile inside them.
if [ "${VARIANTS:-0}" = 1 ]; then
  for variant in eager compile; do
    flag=--disable-cuda-graph
    [ "$variant" = compile ] && flag=--enable-torch-compile
    step "one_batch_${BIG}_$variant" 300 $PY -m plait.bench.one_batch --model-path "$BIG" --load-format dummy \
      --dtype bfloat16 --context-length 8192 --shapes 1x1024x128 --warmup 4 $flag \
      --ceilings "$OUT/ceilings.json" --baseline "$OUT/hf_$BIG.jsonl" --result-file "$OUT/one_batch_${BIG}_$variant.jsonl"
  done
fi

if [ "${SKIP_GSP:-0}" != 1 ]; then
  for cache in on off; do
    flag=()
    [ "$cache" = off ] && flag=(--disable-radix-cache)
    step "gsp_cache_$cache" 400 $PY -m plait.bench.offline_throughput --model-path "$GSP_MODEL" --load-format dummy \
      --dtype bfloat16 --context-length 8192 --dataset-name generated-shared-prefix "${GSP[@]}" \
      --warmup-requests 16 --run-name "cache $cache" "${flag[@]}" --result-file "$OUT/gsp.jsonl"
  done
fi

$PY scripts/gpu/bench_table.py "$OUT" | tee "$OUT/table.txt"
