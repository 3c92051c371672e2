#!/usr/bin/env bash
# One GPU round for the Triton attention backend and the fused layer ops: correctness tests, then
# kernel timings against the measured ceilings. Run from the repository root on the GPU machine:
#   OUT=/some/dir bash scripts/gpu/attention_kernels.sh [--no-sweep]
set -o pipefail
OUT=${OUT:-/tmp/attention_kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .wheels ]; then  # the server's dependencies, without the numpy the machine's torch was built with
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(ls .wheels/*.whl | grep -v numpy) && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
SWEEP=--sweep
[ "$1" = "--no-sweep" ] && SWEEP=
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 270 python3 -m pytest tests/gpu/test_triton_attention.py tests/gpu/test_fused_ops.py -q -p no:cacheprovider \
  --maxfail=15 -rf --durations=8 2>&1 | tee "$OUT/tests.log"
timeout 300 python3 -m plait.bench.attention_kernels $SWEEP --prefill-model llama-3.1-8b \
  --output "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench.log"
