"""What one `gen` asks of a backend, built on the one `SamplingParams`.

A `gen` (or `run`) names only the fields it wants to change; `GenOverrides` holds exactly those.
The interpreter resolves them against the program defaults into a `GenParams`: a full
`SamplingParams` plus the request-level logprob options and the frontend-only `dtype`.
No sampling field is listed here: routing goes by `SamplingParams.field_names()`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from plait.sampling_params import SamplingParams

# Regexes a `dtype` turns into (SGLang's constants; the trailing whitespace lets a number end).
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""  # not ".*": that pattern broke some grammar compilers
REGEX_STRING = REGEX_STR  # the older name

DTYPE_REGEX = {"int": REGEX_INT, "float": REGEX_FLOAT, "bool": REGEX_BOOL, "str": REGEX_STR}

# gen() spells two SamplingParams fields differently (OpenAI's names).
GEN_ARG_ALIASES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}


@dataclass(frozen=True)
class LogprobOptions:
    """Request-level (not sampling) fields of SGLang's `/generate`; None = not asked."""

    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def request_fields(self) -> dict[str, Any]:
        """The fields to send as top-level `/generate` keys (only those set)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def normalize_dtype(dtype: Any) -> str | None:
    """`int`/"int", `float`/"float", `str`/"str", `bool`/"bool" -> the name; anything else raises."""
    if dtype is None:
        return None
    name = dtype.__name__ if isinstance(dtype, type) else dtype
    if name not in DTYPE_REGEX:
        raise ValueError(f"unsupported dtype {dtype!r}: use int, float, str or bool")
    return name


@dataclass(frozen=True)
class GenOverrides:
    """The fields one `gen`/`run` sets; everything absent is inherited."""

    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams field -> value
    logprob: dict[str, Any] = field(default_factory=dict)  # LogprobOptions field -> value
    dtype: str | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> GenOverrides:
        """Route keyword arguments by name; None means "not given". Unknown names raise TypeError."""
        sampling_names = set(SamplingParams.field_names())
        logprob_names = set(LogprobOptions.field_names())
        sampling: dict[str, Any] = {}
        logprob: dict[str, Any] = {}
        dtype = None
        for key, value in kwargs.items():
            if value is None:
                continue
            key = GEN_ARG_ALIASES.get(key, key)
            if key == "dtype":
                dtype = normalize_dtype(value)
            elif key in sampling_names:
                sampling[key] = _as_list(value) if key in ("stop", "stop_token_ids", "stop_regex") else value
            elif key in logprob_names:
                logprob[key] = value
            else:
                raise TypeError(f"unknown generation parameter {key!r}")
        if sampling.get("regex") is not None:
            re.compile(sampling["regex"])  # fail at the call site, not deep in the server
            if dtype is not None:
                warnings.warn("both dtype and regex given: dtype wins", stacklevel=3)
                del sampling["regex"]
        if sampling.get("json_schema") is not None and not isinstance(sampling["json_schema"], str):
            import json

            sampling["json_schema"] = json.dumps(sampling["json_schema"])
        return cls(sampling, logprob, dtype)

    def __bool__(self) -> bool:
        return bool(self.sampling or self.logprob or self.dtype)


@dataclass(frozen=True)
class GenParams:
    """Everything a backend needs for one generation call."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprob: LogprobOptions = field(default_factory=LogprobOptions)
    dtype: str | None = None

    @classmethod
    def program_defaults(cls, overrides: GenOverrides) -> GenParams:
        """The defaults a program run gives every gen (`run(temperature=0, ...)`)."""
        from plait.lang.global_config import global_config

        base = SamplingParams(
            skip_special_tokens=global_config.skip_special_tokens_in_output,
            spaces_between_special_tokens=global_config.spaces_between_special_tokens_in_out,
        )
        return cls().resolve(overrides, base=base)

    def resolve(self, overrides: GenOverrides, *, extra_stop: tuple[str, ...] | list[str] = (),
                base: SamplingParams | None = None) -> GenParams:
        """These defaults with a gen's overrides applied, then the chat template's stop strings."""
        sampling = dataclasses.replace(base or self.sampling, **overrides.sampling)
        stop = [s for s in _as_list(sampling.stop) if s]  # an empty stop string would match everywhere
        stop += [s for s in extra_stop if s and s not in stop]
        sampling = dataclasses.replace(sampling, stop=stop)
        logprob = dataclasses.replace(self.logprob, **overrides.logprob)
        return GenParams(sampling, logprob, overrides.dtype or self.dtype)

    def replace(self, **sampling_changes: Any) -> GenParams:
        return dataclasses.replace(self, sampling=dataclasses.replace(self.sampling, **sampling_changes))

    def with_dtype_as_regex(self) -> GenParams:
        """How runtime backends honour `dtype`: a regex constraint, and numbers end at whitespace."""
        if self.dtype is None:
            return self
        stop = list(self.sampling.stop)
        if self.dtype in ("int", "float"):
            stop += [s for s in (" ", "\n") if s not in stop]
        return dataclasses.replace(self, dtype=None).replace(regex=DTYPE_REGEX[self.dtype], stop=stop)


def srt_sampling_dict(sampling: SamplingParams) -> dict[str, Any]:
    """`sampling_params` of a `/generate` request: every field that has a value.

    Explicit values always (the server's model-derived defaults must not change a program's
    meaning); None fields are left out so older servers never see keys they lack.
    """
    d = {k: v for k, v in dataclasses.asdict(sampling).items() if v is not None}
    if "seed" in d:
        d["sampling_seed"] = d.pop("seed")  # SGLang's key; Plait accepts both
    return d


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    return list(value)
