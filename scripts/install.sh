#!/usr/bin/env bash
# Install Plait and its dependencies into the current Python (a CPU build of torch where one is on disk).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the CPU build this machine carries; pip then keeps it.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
