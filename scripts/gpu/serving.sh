#!/usr/bin/env bash
# plait.bench.serving against `plait serve` on one GPU: the server on a dummy-weight preset
# (default Llama-3.1-8B shapes, bf16) with a synthetic tokenizer of the preset's vocabulary size
# (scripts/gpu/make_tokenizer.py; prompts are sent as token ids), in four configurations (CONFIGS):
#   default (prefix cache on, overlap scheduling on, shared-prefix decode on), --disable-shared-prefix-decode,
#   --disable-overlap-schedule, --disable-radix-cache.
# Each runs the generated-shared-prefix workload (64 groups x 16 prompts, system prompt 2048,
# question 128, output 256, all requests at once), and the default and no-overlap servers also run
# one request at a time (random 1024 -> 128 tokens, 8 requests) for the time per output token at batch 1.
# Results append to $OUT/serving.jsonl; logs to $OUT/serve_*.log. Run from the repository root with
# plait importable.
#
#   OUT=results/gpu bash scripts/gpu/serving.sh
#   QUICK=1 MODEL=llama-3.2-1b bash scripts/gpu/serving.sh    # a smoke run
#   CONFIGS="default no_shared_prefix" SKIP_ONE=1 bash scripts/gpu/serving.sh   # two servers, shared prefix only
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-3.1-8b}
DEVICE_FLAGS=${DEVICE_FLAGS:-}
PORT=${PORT:-30000}
CONFIGS=${CONFIGS:-"default no_shared_prefix no_overlap no_cache"}  # which servers to run
if [ "${QUICK:-0}" = 1 ]; then
  GSP=(--gsp-num-groups 8 --gsp-prompts-per-group 4 --gsp-system-prompt-len 512 --gsp-question-len 64 --gsp-output-len 32)
  ONE=(--num-prompts 2 --random-input-len 256 --random-output-len 32)
else
  GSP=(--gsp-num-groups 64 --gsp-prompts-per-group 16 --gsp-system-prompt-len 2048 --gsp-question-len 128 --gsp-output-len 256)
  ONE=(--num-prompts 8 --random-input-len 1024 --random-output-len 128)
fi
TOK=$(mktemp -d)
$PY scripts/gpu/make_tokenizer.py "$TOK" --preset "$MODEL" || exit 1

bench() {  # bench RUN_NAME ARGS...: one plait.bench.serving run against the live server
  local name=$1
  shift
  echo "=== serving $name ($(date +%T))"
  timeout 400 $PY -m plait.bench.serving --port "$PORT" --warmup-requests 4 --run-name "$name" \
    --output-file "$OUT/serving.jsonl" "$@" 2>&1 | grep -v "^$" | tail -28
  [ "${PIPESTATUS[0]}" = 0 ] || echo "!!! serving $name failed" | tee -a "$OUT/failures.log"
}

with_server() {  # with_server NAME "SERVER FLAGS" -- then the bench calls in the function body below
  local name=$1 flags=$2
  echo "=== server $name: $flags ($(date +%T))"
  $PY -m plait.launch_server --model-path "$MODEL" --load-format dummy --dtype bfloat16 --context-length 8192 \
    --tokenizer-path "$TOK" --port "$PORT" $DEVICE_FLAGS $flags > "$OUT/serve_$name.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do
    curl -sf "localhost:$PORT/health" > /dev/null && break
    kill -0 $SERVER 2> /dev/null || break
    sleep 1
  done
  if ! curl -sf "localhost:$PORT/health" > /dev/null; then
    echo "!!! server $name did not start" | tee -a "$OUT/failures.log"
    tail -20 "$OUT/serve_$name.log"
    kill $SERVER 2> /dev/null
    return 1
  fi
  grep -E "KV pool|CUDA graph" "$OUT/serve_$name.log" | cut -c1-300 | head -3
}

stop_server() {
  kill -TERM $SERVER 2> /dev/null
  for _ in $(seq 30); do kill -0 $SERVER 2> /dev/null || break; sleep 1; done
  kill -KILL $SERVER 2> /dev/null
  wait $SERVER 2> /dev/null
}

want() { [[ " $CONFIGS " == *" $1 "* ]]; }

if want default && with_server default ""; then
  [ "${SKIP_ONE:-0}" = 1 ] || bench "batch 1, overlap on" --dataset-name random "${ONE[@]}" --max-concurrency 1
  bench "shared prefix, cache on" --dataset-name generated-shared-prefix "${GSP[@]}"
  stop_server
fi
if want no_shared_prefix && with_server no_shared_prefix "--disable-shared-prefix-decode"; then
  bench "shared prefix, cache on, shared-prefix decode off" --dataset-name generated-shared-prefix "${GSP[@]}"
  stop_server
fi
if want no_overlap && with_server no_overlap "--disable-overlap-schedule"; then
  bench "batch 1, overlap off" --dataset-name random "${ONE[@]}" --max-concurrency 1
  bench "shared prefix, cache on, overlap off" --dataset-name generated-shared-prefix "${GSP[@]}"
  stop_server
fi
if want no_cache && with_server no_cache "--disable-radix-cache"; then
  bench "shared prefix, cache off" --dataset-name generated-shared-prefix "${GSP[@]}"
  stop_server
fi
rm -rf "$TOK"
