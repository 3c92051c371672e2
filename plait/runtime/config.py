"""Runtime configuration: frozen dataclasses, one per concern.

The command line and `Engine(**options)` are both generated from these fields, so every default
lives in exactly one place. Derived values are properties or resolved by the component that owns them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    model_path: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    tokenizer_path: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    context_length: int | None = None  # default: the model's max_position_embeddings
    chat_template: str | None = None  # a Jinja template or a path to one; default: the tokenizer's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attention_backend: str | None = None  # default: torch_native on CPU
    random_seed: int = 0


@dataclass(frozen=True)
class MemoryConfig:
    max_total_tokens: int | None = None  # KV pool size in tokens; default from memory
    mem_fraction_static: float | None = None  # GPU: fraction of memory for weights + KV pool
    max_running_requests: int | None = None  # rows of req_to_token; default derived from the pool


@dataclass(frozen=True)
class RuntimeConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)

    @classmethod
    def from_options(cls, **options: Any) -> "RuntimeConfig":
        """Route flat keyword options (as `Engine(**options)` and the CLI take them) to their section."""
        sections: dict[str, dict[str, Any]] = {}
        unknown = dict(options)
        for section in dataclasses.fields(cls):
            names = {f.name for f in dataclasses.fields(section.default_factory)}  # type: ignore[arg-type]
            sections[section.name] = {k: unknown.pop(k) for k in list(unknown) if k in names}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return cls(**{name: f.default_factory(**sections[name]) for name, f in  # type: ignore[misc]
                      ((f.name, f) for f in dataclasses.fields(cls))})
