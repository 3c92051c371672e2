#!/usr/bin/env bash
# The online-serving sequence of docs/performance-cpu.md against one running OpenAI-compatible
# server: random then generated-shared-prefix prompts, each at 1 then 4 requests/s (Poisson), 48
# requests, streamed, greedy, prompts as token ids. The rate-4 runs meet the rate-1 runs' prompts again
# (same seed), as in the recorded tables. Results append to $OUT/serving_cpu.jsonl.
#
#   bash scripts/cpu_serving.sh NAME PORT [MODEL]       # MODEL: the server's model name, if it wants one
# Start it once the server is ready (Plait: `/health` answers 200 only after the model is loaded).
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1 port=$2 model=${3:-}
OUT=${OUT:-bench_results/cpu}
mkdir -p "$OUT"
common=(--backend openai --base-url "http://127.0.0.1:$port" --prompt-format ids --warmup-requests 2 --seed 1
        --output-file "$OUT/serving_cpu.jsonl")
[ -n "$model" ] && common+=(--model "$model")
random=(--dataset-name random --num-prompts 48 --random-input-len 256 --random-output-len 64)
gsp=(--dataset-name generated-shared-prefix --gsp-num-groups 4 --gsp-prompts-per-group 12 --gsp-system-prompt-len 512
     --gsp-question-len 64 --gsp-output-len 64)
for dataset in random gsp; do
  for rate in 1 4; do
    if [ "$dataset" = random ]; then args=("${random[@]}"); else args=("${gsp[@]}"); fi
    echo "=== $name $dataset rate $rate ($(date +%T))"
    python -m plait.bench.serving "${common[@]}" "${args[@]}" --request-rate "$rate" --run-name "$name $dataset r$rate" \
      2>&1 | grep -E "Successful|Benchmark duration|Request throughput|Output token|Mean \(ms\)|Cache hit" | head -10
  done
done
