#!/usr/bin/env bash
# Install, then run the test suite (CPU; GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q -p no:cacheprovider "$@"
