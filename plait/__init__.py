"""Plait: structured LLM programs and a runtime that exploits their structure.

`import plait` stays light (no torch): the runtime is imported on first use of `plait.Engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Bound eagerly (it is tiny) so the name stays the settings object even after someone imports the
# module of the same name (`from plait.global_config import global_config`, SGLang's old path).
from plait.global_config import global_config
from plait.sampling_params import SamplingParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from plait.runtime.engine import Engine

_LAZY = {"Engine": "plait.runtime.engine"}
# The frontend language (SGLang's names: `import plait as sgl` runs SGLang programs).
_LANG_API = (
    "function", "gen", "gen_int", "gen_string", "select", "image", "video", "system", "user", "assistant",
    "system_begin", "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end",
    "separate_reasoning", "set_default_backend", "flush_cache", "get_server_info",
)
_LAZY.update({name: "plait.lang.api" for name in _LANG_API})
_LAZY.update({
    "token_length_normalized": "plait.lang.choices",
    "greedy_token_selection": "plait.lang.choices",
    "unconditional_likelihood_normalized": "plait.lang.choices",
    "RuntimeEndpoint": "plait.lang.backend.runtime_endpoint",
    "Runtime": "plait.lang.backend.runtime",
    "EngineBackend": "plait.lang.backend.engine_backend",
    "OpenAI": "plait.lang.backend.openai",  # imports the openai client only when constructed
    "workflow": "plait.lang.workflow",
})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plait' has no attribute {name!r}")


__all__ = ["SamplingParams", "__version__", "global_config", *_LAZY]
