"""The one definition of per-request sampling parameters.

The frontend language, the HTTP layer, the OpenAI layer and the runtime all convert *into*
this dataclass; nobody re-lists its fields. It imports no torch so the frontend stays light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Below this temperature sampling is greedy (SGLang's rule).
GREEDY_TEMPERATURE = 1e-6


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range or of the wrong type."""


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[int, float] | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    stop_regex: list[str] = field(default_factory=list)
    stream_interval: int | None = None
    custom_params: dict[str, Any] | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, defaults: dict[str, Any] | None = None) -> "SamplingParams":
        """Build from a request dict (SGLang's `sampling_params`).

        `None` values mean "use the default"; `defaults` (e.g. the model's generation_config)
        fill keys the request does not give. Unknown keys are an error, so typos are not
        silently ignored. `sampling_seed` is accepted as an alias of `seed`.
        """
        d = dict(d or {})
        if "sampling_seed" in d and d.get("seed") is None:
            d["seed"] = d.pop("sampling_seed")
        d.pop("sampling_seed", None)
        names = set(cls.field_names())
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in (defaults or {}).items() if k in names and v is not None}
        kwargs.update({k: v for k, v in d.items() if v is not None})
        params = cls(**kwargs)
        params.normalize()
        params.verify()
        return params

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def clone(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def normalize(self) -> None:
        """Bring equivalent spellings to one form (a single stop string becomes a list, ...)."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        self.stop = [s for s in self.stop if s != ""]
        self.stop_token_ids = list(self.stop_token_ids)
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            import json

            self.json_schema = json.dumps(self.json_schema)
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.temperature < GREEDY_TEMPERATURE:
            self.top_k = 1
        if self.top_k == 0:
            self.top_k = -1

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise SamplingParamsError with a message naming the bad field."""

        def bad(msg: str) -> None:
            raise SamplingParamsError(msg)

        def check_type(name: str, types: tuple[type, ...]) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) and bool not in types:
                bad(f"{name} must be a number, got {value!r}")
            if not isinstance(value, types):
                bad(f"{name} must be of type {'/'.join(t.__name__ for t in types)}, got {value!r}")

        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            check_type(name, (int, float))
        for name in ("top_k", "min_new_tokens", "n"):
            check_type(name, (int,))
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            check_type(name, (bool,))
        if self.max_new_tokens is not None:
            check_type("max_new_tokens", (int,))
            if self.max_new_tokens < 0:
                bad(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            bad(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            bad(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not 0 < self.repetition_penalty <= 2:
            bad(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.n < 1:
            bad(f"n must be >= 1, got {self.n}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            bad("stop must be a string or a list of strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be a list of non-negative integers")
        constraints = [k for k in ("regex", "json_schema", "ebnf", "structural_tag") if getattr(self, k) is not None]
        if len(constraints) > 1:
            bad(f"only one constraint may be given, got {', '.join(constraints)}")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if t >= vocab_size:
                    bad(f"stop_token_ids entry {t} is outside the vocabulary (size {vocab_size})")
            for t in (self.logit_bias or {}):
                if not 0 <= t < vocab_size:
                    bad(f"logit_bias token {t} is outside the vocabulary (size {vocab_size})")
