"""Plait: structured LLM programs and a runtime that exploits their structure.

`import plait` stays light (no torch): the runtime is imported on first use of `plait.Engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plait.sampling_params import SamplingParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from plait.runtime.engine import Engine

_LAZY = {"Engine": "plait.runtime.engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plait' has no attribute {name!r}")


__all__ = ["Engine", "SamplingParams", "__version__"]
