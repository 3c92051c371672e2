#!/usr/bin/env bash
# Install into the checkout's .venv (scripts/install.sh), then run the test suite with it (CPU; GPU
# tests skip without a GPU). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
venv=${PLAIT_VENV:-.venv}
"$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=20 "$@"
