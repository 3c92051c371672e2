#!/usr/bin/env bash
# One sitting of the paper's workloads (python -m plait.bench.programs) on the CPU default model, one
# engine at a time on the same machine:
#   1. `plait serve` with default settings: the suite through the native frontend path (label plait),
#      then the frontend ablations (no-parallelism, no-hints), then through its OpenAI API (plait-openai);
#   2. one `plait serve` per runtime ablation (no-cache, flat-cache, fcfs, random, no-jump-forward),
#      batch runs recorded as ablations of plait;
#   3. vLLM for CPU (bf16 Hugging Face folder of the same weights, prefix caching on);
#   4. llama.cpp's llama-server (BF16 GGUF of the same weights);
#   5. tables (OUTDIR/tables.md) and figures (OUTDIR/figures/*.png) from OUTDIR/results.jsonl.
# A peer that is not installed is skipped. Rerunning with the same OUTDIR skips the runs already in
# results.jsonl (--skip-done), so an interrupted sitting can be finished.
#
#   bash scripts/bench_programs_sitting.sh OUTDIR
#   SIZE=quick ENGINES="plait vllm" bash scripts/bench_programs_sitting.sh /tmp/dry   # a dry run
#
# Environment: PY (a Python with Plait installed; default .venv/bin/python), SIZE (cpu), ENGINES
# ("plait plait-ablations vllm llama"), WORKLOADS (all), ABLATION_WORKLOADS (the workloads of the
# ablation runs), THREADS (run_batch threads, 64), and where the peers are: PEERS (default
# $TMPDIR/cpupeers), VLLM_PY, VLLM_MODEL, VLLM_DTYPE (bfloat16; float32 is vLLM's faster choice on a
# CPU without AVX-512 BF16), VLLM_EXCLUDE (workloads vLLM skips, e.g. hellaswag: scoring endings
# through its OpenAI API one request at a time does not finish within the suite's bound), LLAMA_SERVER,
# LLAMA_GGUF.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_programs_sitting.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-.venv/bin/python}
SIZE=${SIZE:-cpu}
ENGINES=${ENGINES:-"plait plait-ablations vllm llama"}
WORKLOADS=${WORKLOADS:-all}
# Where the paper's Fig. 8c found the switches to matter, and JSON for jump-forward.
ABLATION_WORKLOADS=${ABLATION_WORKLOADS:-mmlu,hellaswag,tree_of_thought,llm_judge,chat_short,dspy_rag}
THREADS=${THREADS:-64}
PEERS=${PEERS:-${TMPDIR:-/tmp}/cpupeers}
VLLM_PY=${VLLM_PY:-$PEERS/vllm-venv/bin/python}
VLLM_MODEL=${VLLM_MODEL:-$PEERS/smollm2-135m}
VLLM_DTYPE=${VLLM_DTYPE:-bfloat16}
LLAMA_SERVER=${LLAMA_SERVER:-$PEERS/llamacpp-build/bin/llama-server}
LLAMA_GGUF=${LLAMA_GGUF:-$PEERS/gguf/smollm2-135m-bf16.gguf}
PORT=${PORT:-30210}
RESULTS=$OUT/results.jsonl
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

log() { echo "=== $* ($(date -u +%T), load $(cut -d' ' -f1 /proc/loadavg))" | tee -a "$OUT/sitting.log"; }

# suite LABEL ARGS...: the programs suite against the server on $PORT.
suite() {
  local label=$1
  shift
  log "suite $label $*"
  timeout 1800 "$PY" -m plait.bench.programs --size "$SIZE" --workloads "$WORKLOADS" --num-threads "$THREADS" \
    --base-url "http://127.0.0.1:$PORT" --label "$label" --result-file "$RESULTS" --skip-done "$@" \
    2>&1 | grep -v "^$" | tee -a "$OUT/sitting.log"
}

# serve NAME CMD...: start a server in the background, wait until $PORT answers; SERVER is its pid.
serve() {
  local name=$1
  shift
  log "start $name: $*"
  "$@" > "$OUT/server_$name.log" 2>&1 &
  SERVER=$!
  local t0=$SECONDS
  for _ in $(seq 1 400); do
    if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; then
      log "$name ready after $((SECONDS - t0)) s"
      return 0
    fi
    kill -0 "$SERVER" 2> /dev/null || break
    sleep 1
  done
  log "$name did not start"
  tail -20 "$OUT/server_$name.log" | tee -a "$OUT/sitting.log"
  stop
  return 1
}

stop() {
  kill "$SERVER" 2> /dev/null
  for _ in $(seq 1 30); do kill -0 "$SERVER" 2> /dev/null || break; sleep 1; done
  kill -9 "$SERVER" 2> /dev/null
  wait "$SERVER" 2> /dev/null
  sleep 2
}

plait_serve() {  # plait_serve NAME FLAGS...
  local name=$1
  shift
  serve "$name" "$PY" -m plait.launch_server --port "$PORT" --served-model-name smollm2 "$@"
}

{
  echo "sitting started $(date -u -Iseconds)"
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|Flags" | cut -c1-200
  free -g | head -2
  git rev-parse --short HEAD
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
  [ -x "$VLLM_PY" ] && "$VLLM_PY" -c 'import vllm; print("vllm", vllm.__version__)' 2> /dev/null
  [ -x "$LLAMA_SERVER" ] && "$LLAMA_SERVER" --version 2>&1 | head -2
} > "$OUT/environment.txt" 2>&1

for engine in $ENGINES; do
  case $engine in
    plait)
      if plait_serve plait; then
        suite plait --backend endpoint
        suite plait --backend endpoint --modes batch --ablations no-parallelism,no-hints \
          --workloads "$ABLATION_WORKLOADS"
        suite plait-openai --backend openai
        stop
      fi
      ;;
    plait-ablations)
      for ablation in no-cache flat-cache fcfs random no-jump-forward; do
        flags=$("$PY" -c "from plait.bench.programs.ablations import ABLATIONS; print(ABLATIONS['$ablation'].launch_flags)")
        workloads=$ABLATION_WORKLOADS
        [ "$ablation" = no-jump-forward ] && workloads=json_decode
        # shellcheck disable=SC2086
        if plait_serve "plait-$ablation" $flags; then
          WORKLOADS=$workloads suite plait --backend endpoint --server-ablation "$ablation"
          stop
        fi
      done
      ;;
    vllm)
      if [ ! -x "$VLLM_PY" ] || [ ! -d "$VLLM_MODEL" ]; then log "vllm: not installed, skipped"; continue; fi
      # Both cores (vLLM keeps one of two in reserve by default) and tcmalloc where installed: its fastest
      # configuration on a 2-core machine. /reset_prefix_cache needs the dev-mode endpoints.
      tc=$(ldconfig -p | awk '/libtcmalloc_minimal.so.4/{print $NF; exit}')
      iomp=$(ls "$(dirname "$(dirname "$VLLM_PY")")"/lib/libiomp5.so 2> /dev/null || true)
      if serve vllm env VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-$(($(nproc) - 1)) \
          VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_SERVER_DEV_MODE=1 \
          LD_PRELOAD="${tc}${iomp:+:$iomp}" \
          "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$VLLM_MODEL" --host 127.0.0.1 --port "$PORT" \
          --served-model-name smollm2 --dtype "$VLLM_DTYPE" --max-model-len 4096 --enable-prefix-caching; then
        # shellcheck disable=SC2086
        suite vllm --backend openai --server vllm ${VLLM_EXCLUDE:+--exclude $VLLM_EXCLUDE}
        stop
      fi
      ;;
    llama)
      if [ ! -x "$LLAMA_SERVER" ] || [ ! -f "$LLAMA_GGUF" ]; then log "llama-server: not installed, skipped"; continue; fi
      # 8 slots of 4,096 tokens (the suite's longest program needs ~2,000).
      if serve llama "$LLAMA_SERVER" -m "$LLAMA_GGUF" --host 127.0.0.1 --port "$PORT" -t "$(nproc)" -tb "$(nproc)" \
          -np 8 -c 32768 --alias smollm2; then
        # llama-server gives no prompt logprobs (`echo`), which `select` scores with: no HellaSwag there.
        suite llama-server --backend openai --server llama.cpp --exclude hellaswag
        stop
      fi
      ;;
    *) log "unknown engine $engine (choose from plait plait-ablations vllm llama)" ;;
  esac
done

log "tables and figures"
"$PY" -m plait.bench.programs --plot "$RESULTS" --plot-dir "$OUT/figures" > "$OUT/tables.md" 2>&1
grep -v "^wrote" "$OUT/tables.md" | grep "^|" | tee -a "$OUT/sitting.log"
log "sitting done"
