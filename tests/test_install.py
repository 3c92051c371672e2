"""Installing Plait as a new user would: the README's install step in a fresh copy of the checkout makes
its own .venv and leaves the system interpreter's packages exactly as they were; a second run has
nothing to do; and a wheel built with `python -m build` installs into a bare venv, where `plait` works
with no checkout in sight.

Both tests install torch and every dependency into new environments (from pip's cache after the first
time), so they are slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _system_env() -> dict[str, str]:
    """The environment of a shell with no virtual environment active (as a new user's is)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLAIT_", "PYTHON"))}
    venv = os.environ.get("VIRTUAL_ENV")
    own_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and p != own_bin and not (venv and p.startswith(venv)))
    env.pop("VIRTUAL_ENV", None)
    return env


def _fresh_checkout(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked and not ignored), without .venv or caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _no_gpu() -> bool:
    return shutil.which("nvidia-smi") is None


def test_install_script_makes_its_own_venv_and_leaves_the_system_python_alone(tmp_path):
    env = _system_env()
    system_python = shutil.which("python3", path=env["PATH"])
    assert system_python is not None
    assert not Path(system_python).is_relative_to(REPO)  # not the project's own .venv
    freeze = [system_python, "-m", "pip", "freeze", "--all", "--disable-pip-version-check"]
    before = _run(freeze, env=env).stdout

    checkout = _fresh_checkout(tmp_path / "checkout")  # not "plait": run from tmp_path, that would be a namespace package
    first = _run(["bash", "scripts/install.sh"], cwd=checkout, env=env)
    venv_python = checkout / ".venv" / "bin" / "python"
    where = _run([str(venv_python), "-c", "import plait, torch; print(plait.__file__); print(torch.__version__)"],
                 cwd=tmp_path, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(checkout)  # the editable install points at this copy
    if _no_gpu():
        assert where[1].endswith("+cpu"), first.stdout  # no multi-GB CUDA build on a machine without a GPU
    second = _run(["bash", "scripts/install.sh"], cwd=checkout, env=env)
    assert "up to date" in second.stdout, second.stdout
    assert "installing" not in second.stdout

    assert _run(freeze, env=env).stdout == before  # the system interpreter's packages are unchanged
    ignored = subprocess.run(["git", "check-ignore", "-q", ".venv"], cwd=REPO)
    assert ignored.returncode == 0  # the venv never shows up in git status


def test_wheel_installs_into_a_bare_venv_and_plait_runs_from_it(tmp_path):
    env = _system_env()
    dist = tmp_path / "dist"
    checkout = _fresh_checkout(tmp_path / "checkout")  # the build's scratch folders stay out of the real checkout
    build = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(checkout)], env=env,
                 cwd=tmp_path)  # not the repository root: a local build/ folder there would shadow `build`
    log = build.stdout + build.stderr
    assert "deprecat" not in log.lower(), log  # setuptools' deprecation warnings (a table `license`, ...)
    (wheel,) = dist.glob("plait-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    _run(["bash", str(checkout / "scripts" / "install_torch.sh"), python], env=env)  # the CPU build where no GPU
    _run([python, "-m", "pip", "install", "-qq", "--disable-pip-version-check", str(wheel)], env=env)

    away = tmp_path / "elsewhere"  # no checkout on the path: only the installed wheel
    away.mkdir()
    plait = str(venv / "bin" / "plait")
    assert _run([plait, "--version"], cwd=away, env=env).stdout.startswith("plait ")
    out = _run([plait, "generate", "The capital of France is", "--raw", "--max-new-tokens", "4"], cwd=away, env=env)
    assert out.stdout.strip(), out.stderr
    origin = _run([python, "-c", "import plait; print(plait.__file__)"], cwd=away, env=env).stdout.strip()
    assert Path(origin).is_relative_to(venv)
