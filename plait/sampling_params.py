"""The one definition of per-request sampling parameters.

The frontend language, the HTTP layer, the OpenAI layer and the runtime all convert *into*
this dataclass; nobody re-lists its fields. It imports no torch so the frontend stays light.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

# Below this temperature sampling is greedy (SGLang's rule).
GREEDY_TEMPERATURE = 1e-6
MAX_LOGIT_BIAS = 100  # OpenAI's range for logit_bias values
MAX_INT32 = 2**31 - 1
_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")  # a logit_bias key; longer digit strings are no token id


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
        if d is not None and not isinstance(d, dict):
            raise SamplingParamsError(f"sampling_params must be an object, got {_kind(d)}")
        d = dict(d or {})
        if "sampling_seed" in d and d.get("seed") is None:
            d["seed"] = d.pop("sampling_seed")
        d.pop("sampling_seed", None)
        names = set(cls.field_names())
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in (defaults or {}).items() if k in names and v is not None}
        kwargs.update({k: v for k, v in d.items() if v is not None})
        params = cls(**kwargs)
        params.check_types()
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

    def check_types(self) -> None:
        """Raise SamplingParamsError unless every field has a type `normalize` and `verify` can
        work on (request data is untrusted: a `logit_bias` of 3 must be a clear error, not a crash)."""

        def bad(name: str, expected: str) -> None:
            raise SamplingParamsError(f"{name} must be {expected}, got {_kind(getattr(self, name))}")

        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                bad(name, "a number")
        for name in ("top_k", "min_new_tokens", "n"):
            if not _is_int(getattr(self, name)):
                bad(name, "an integer")
        for name in ("max_new_tokens", "seed", "stream_interval"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                bad(name, "an integer")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a boolean")
        for name in ("stop", "stop_regex"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                bad(name, "a string or a list of strings")
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "an object mapping token ids to biases")
            for key, bias in self.logit_bias.items():
                if not (_is_int(key) or (isinstance(key, str) and _TOKEN_ID.fullmatch(key))):
                    raise SamplingParamsError(f"logit_bias keys must be token ids, got {str(key)[:40]!r}")
                if not _is_number(bias):
                    raise SamplingParamsError(f"logit_bias values must be numbers, got {_kind(bias)} for token {key}")
        for name in ("regex", "ebnf"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                bad(name, "a string")
        for name in ("json_schema", "structural_tag"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, dict)):
                bad(name, "a string or an object")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            bad("custom_params", "an object")

    def normalize(self) -> None:
        """Bring equivalent spellings to one form (a single stop string becomes a list, ...)."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("json_schema", "structural_tag"):
            if isinstance(getattr(self, name), dict):
                import json

                setattr(self, name, json.dumps(getattr(self, name)))
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
            if not math.isfinite(getattr(self, name)):
                bad(f"{name} must be a finite number, got {getattr(self, name)}")
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
        if not -1 <= self.top_k <= MAX_INT32:
            bad(f"top_k must be -1 (disabled) or in [1, {MAX_INT32}], got {self.top_k}")
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
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad(f"seed must fit in 64 bits, got {self.seed}")
        if self.stream_interval is not None and not 1 <= self.stream_interval <= MAX_INT32:
            bad(f"stream_interval must be >= 1, got {self.stream_interval}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            bad("stop must be a string or a list of strings")
        if any(s == "" for s in self.stop):
            bad("stop strings must not be empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be a list of non-negative integers")
        for t, bias in (self.logit_bias or {}).items():
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                bad(f"logit_bias values must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias} for token {t}")
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # An integer too large for a float is no number a sampler can use (float() would overflow).
    return isinstance(value, float) or (_is_int(value) and abs(value) < 2**1000)


def _kind(value: Any) -> str:
    """How an error message names a wrong value: short, and never the whole of a huge one."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
