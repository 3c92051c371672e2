#!/usr/bin/env bash
# Install Plait into the checkout's own virtual environment, .venv (ignored by git), and leave every
# other Python alone. Needs python3 >= 3.11 with its venv module; nothing else.
#
# torch: machines with an NVIDIA driver get PyPI's default (CUDA) build; others get a CPU build, the
# pinned release if pip resolves it to a CPU wheel (a local wheel file, say), else PyTorch's CPU index.
# A second run finds the environment up to date (same pyproject.toml, same script) and returns in seconds.
#
# Environment: PLAIT_PYTHON (the interpreter that makes the venv; default python3), PLAIT_VENV (where;
# default .venv in the checkout), PLAIT_TORCH=cpu|cuda (instead of looking for an NVIDIA driver).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python=${PLAIT_PYTHON:-python3}
venv=${PLAIT_VENV:-.venv}
cpu_torch="torch==2.13.0"  # the release tried first for a CPU build; inside pyproject.toml's range
cpu_index="https://download.pytorch.org/whl/cpu"
say() { echo "install: $*"; }

if ! command -v "$python" >/dev/null 2>&1; then
  echo "install: $python not found; install Python 3.11 or newer (and its venv module)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install: Plait needs Python >= 3.11; $python is $("$python" -V 2>&1)" >&2
  exit 1
fi

# The stamp records what the environment was made from; a match means there is nothing to do.
stamp_file="$venv/.plait-install"
stamp=$(cat pyproject.toml "$0" | "$python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] \
    && "$venv/bin/python" -c 'import torch, plait' 2>/dev/null; then
  say "$venv is up to date ($(( SECONDS - start )) s); activate it with: source $venv/bin/activate"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  say "creating $venv with $("$python" -V 2>&1)"
  if ! "$python" -m venv "$venv"; then
    echo "install: '$python -m venv' failed; on Debian/Ubuntu install the python3-venv package" >&2
    exit 1
  fi
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip --disable-pip-version-check)
rm -f "$stamp_file"

if "$vpy" -c 'import torch' 2>/dev/null; then
  say "torch $("$vpy" -c 'from importlib.metadata import version; print(version("torch"))') already in $venv"
else
  want=${PLAIT_TORCH:-}
  if [[ -z "$want" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then want=cuda; else want=cpu; fi
  fi
  if [[ "$want" == cuda ]]; then
    say "torch: an NVIDIA GPU is present, installing PyPI's build (CUDA; a few GB)"
    "${pip[@]}" install -qq --progress-bar off "$(sed -n 's/^ *"\(torch[^"]*\)".*/\1/p' pyproject.toml)"
  else
    # Which wheel would pip take for the pinned release? A "+cpu" one (a local file) is the CPU build.
    resolved=$("${pip[@]}" install -qq --dry-run --no-deps --ignore-installed --report - "$cpu_torch" 2>/dev/null \
      | "$vpy" -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' 2>/dev/null || true)
    if [[ "$resolved" == *+cpu ]]; then
      say "torch: no GPU, installing the CPU build $resolved (found by pip as it is set up here)"
      "${pip[@]}" install -qq "$cpu_torch"
    else
      say "torch: no GPU, installing the CPU build from $cpu_index"
      "${pip[@]}" install -qq --progress-bar off --no-deps --index-url "$cpu_index" \
        "$(sed -n 's/^ *"\(torch[^"]*\)".*/\1/p' pyproject.toml)"
    fi
    say "torch: installed $("$vpy" -c 'from importlib.metadata import version; print(version("torch"))')"
  fi
fi

say "installing plait (editable) and its dependencies into $venv"
"${pip[@]}" install -qq --progress-bar off -e ".[test]"
echo "$stamp" >"$stamp_file"
say "done in $(( SECONDS - start )) s; activate it with: source $venv/bin/activate"
