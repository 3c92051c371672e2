#!/usr/bin/env bash
# Install Plait into the checkout's own virtual environment, .venv (ignored by git), and leave every
# other Python alone. Needs python3 >= 3.11 with its venv module; nothing else.
#
# torch: scripts/install_torch.sh (the CPU build on machines without an NVIDIA GPU).
# A second run finds the environment up to date (same metadata, kernel sources and scripts) and returns in
# seconds. Plait's optional CPU kernels are compiled on the way where a C++ compiler is found.
#
# Environment: PLAIT_PYTHON (the interpreter that makes the venv; default python3), PLAIT_VENV (where;
# default .venv in the checkout), PLAIT_TORCH=cpu|cuda (which torch build; default: cuda where an NVIDIA
# driver answers).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
python=${PLAIT_PYTHON:-python3}
venv=${PLAIT_VENV:-.venv}
say() { echo "install: $*"; }

if ! command -v "$python" >/dev/null 2>&1; then
  echo "install: $python not found; install Python 3.11 or newer (and its venv module)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install: Plait needs Python >= 3.11; $python is $("$python" -V 2>&1)" >&2
  exit 1
fi

# The stamp records what the environment was made from (the package's metadata and the sources of its
# compiled CPU kernels, which an editable install builds once); a match means there is nothing to do.
stamp_file="$venv/.plait-install"
stamp=$(cat pyproject.toml setup.py plait/runtime/cpu/csrc/* scripts/install.sh scripts/install_torch.sh | "$python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] \
    && "$venv/bin/python" -c 'from importlib.metadata import version; version("torch"); version("plait")' 2>/dev/null; then
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

bash scripts/install_torch.sh "$vpy"

say "installing plait (editable; compiling its CPU kernels where a C++ compiler is found) and its dependencies into $venv"
"${pip[@]}" install -qq --progress-bar off -e ".[test]"
echo "$stamp" >"$stamp_file"
say "done in $(( SECONDS - start )) s; activate it with: source $venv/bin/activate"
