#!/usr/bin/env bash
# Install torch into the environment of the Python interpreter given (a venv's bin/python), once:
# machines with an NVIDIA driver get PyPI's default (CUDA) build, others a CPU build: the pinned release
# when pip resolves it to a CPU wheel (a local wheel file, say), else PyTorch's CPU index. PLAIT_TORCH=cpu|cuda
# decides instead of looking for the driver.
set -euo pipefail
cd "$(dirname "$0")/.."
vpy=$1
pip=("$vpy" -m pip --disable-pip-version-check)
cpu_torch="torch==2.13.0"  # the release tried first for a CPU build; inside pyproject.toml's range
cpu_index="https://download.pytorch.org/whl/cpu"
torch_range=$(sed -n 's/^ *"\(torch[^"]*\)".*/\1/p' pyproject.toml)
installed() { "$vpy" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null; }
say() { echo "install: torch: $*"; }

if version=$(installed); then
  say "$version already installed"
  exit 0
fi
want=${PLAIT_TORCH:-}
if [[ -z "$want" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want=cuda; else want=cpu; fi
fi
if [[ "$want" == cuda ]]; then
  say "an NVIDIA GPU is present, installing PyPI's build (CUDA; a few GB)"
  "${pip[@]}" install -qq "$torch_range"
else
  # Which wheel would pip take for the pinned release? A "+cpu" version is the CPU build.
  resolved=$("${pip[@]}" install -qq --dry-run --no-deps --ignore-installed --report - "$cpu_torch" 2>/dev/null \
    | "$vpy" -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' 2>/dev/null || true)
  if [[ "$resolved" == *+cpu ]]; then
    say "no GPU, installing the CPU build $resolved (found by pip as it is set up here)"
    "${pip[@]}" install -qq "$cpu_torch"
  else
    # torch alone from PyTorch's CPU index; its dependencies come from the usual index afterwards.
    say "no GPU, installing the CPU build from $cpu_index"
    "${pip[@]}" install -qq --no-deps --index-url "$cpu_index" "$torch_range"
  fi
fi
say "installed $(installed)"
