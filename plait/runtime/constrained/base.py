"""The grammar-backend interface: what a constraint compiles to and how a request walks it.

A constraint is a `GrammarKey(kind, spec)`:

- `regex`: the whole output matches the regex (the backend's syntax: no look-around, no
  backreferences, no `\\b`).
- `json_schema`: the output is one JSON document valid under the schema, written compactly with
  `json.dumps`' default separators (`", "` and `": "`, no other whitespace). Fixed spacing keeps
  small models from padding with endless newlines and makes the forced strings long
  (`{"name": "` is one jump). An object that lists `properties` accepts no others
  (`close_objects`).
- `json_object`: any JSON object (OpenAI's `response_format: json_object`; SGLang's
  `json_schema == "$$ANY$$"`), same spacing.
- `ebnf`: a GBNF grammar (llama.cpp syntax) with a `root` rule.
- `choices`: a JSON list of strings; the output is exactly one of them.
- `structural_tag`: SGLang's tool-call tags (`{"structures": [{"begin", "schema", "end"}],
  "triggers": [...]}`): free text until a trigger, then `begin`, JSON under `schema`, `end`.
  xgrammar also takes its own structural-tag format.

A backend compiles a key into a `CompiledGrammar` (shared, immutable, cached by the manager) and
makes a fresh `GrammarMatcher` per request from it. Backends are chosen by name from
`GRAMMAR_BACKENDS` (`--grammar-backend`). This module imports neither torch nor a grammar library.
"""

from __future__ import annotations

import importlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

    from plait.sampling_params import SamplingParams

KINDS = ("regex", "json_schema", "json_object", "ebnf", "choices", "structural_tag")
ANY_JSON_SCHEMA = "$$ANY$$"  # SGLang's json_schema value for "any JSON object"
JSON_SEPARATORS = (", ", ": ")  # item, key: the only spacing JSON output may use

GRAMMAR_BACKENDS: dict[str, str] = {
    "xgrammar": "plait.runtime.constrained.xgrammar_backend:XGrammarBackend",
    "llguidance": "plait.runtime.constrained.llguidance_backend:LLGuidanceBackend",
}
DEFAULT_GRAMMAR_BACKEND = "llguidance"  # docs/constrained.md has the measurements


class GrammarError(ValueError):
    """A constraint that cannot be compiled (bad regex, schema or grammar). The message says why
    and is meant for the client (HTTP 400)."""


class GrammarKey(NamedTuple):
    kind: str  # one of KINDS
    spec: str  # the regex / schema / grammar text, exactly as the request gave it


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled constraint, shared by every request with the same key. Never mutated."""

    key: GrammarKey
    handle: Any  # the backend's compiled object
    compile_s: float  # wall time the compile took (for logs and the benchmark)


def grammar_key(params: SamplingParams) -> GrammarKey | None:
    """The constraint a request asks for, or None when it is unconstrained.

    `SamplingParams.verify` already refuses more than one constraint."""
    if params.regex is not None:
        return GrammarKey("regex", params.regex)
    if params.json_schema is not None:
        if params.json_schema == ANY_JSON_SCHEMA:
            return GrammarKey("json_object", "")
        return GrammarKey("json_schema", params.json_schema)
    if params.ebnf is not None:
        return GrammarKey("ebnf", params.ebnf)
    if params.structural_tag is not None:
        return GrammarKey("structural_tag", params.structural_tag)
    return None


def validate_constraint(params: SamplingParams, backend_name: str = DEFAULT_GRAMMAR_BACKEND) -> None:
    """Cheap check for the HTTP layer: raise GrammarError if the request's constraint cannot compile.

    It parses the spec with the backend's own parser (no tokenizer, no token masks: well under a
    millisecond for a regex, a few for a large schema), so a bad spec fails with 400 before it
    reaches the scheduler. Compiling can still fail later for reasons a parse cannot see (size
    limits); the scheduler then aborts the request with the same error type.
    """
    key = grammar_key(params)
    if key is not None:
        backend_class(backend_name).check(key)


def backend_class(name: str) -> type[GrammarBackend]:
    if name not in GRAMMAR_BACKENDS:
        raise ValueError(f"unknown grammar backend {name!r}; choose from {sorted(GRAMMAR_BACKENDS)}")
    module_name, cls_name = GRAMMAR_BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"grammar backend {name!r} is not installed: {e}") from e
    return getattr(module, cls_name)


class GrammarMatcher(ABC):
    """One request's position in its grammar. Stateful and not thread-safe: the scheduler thread
    owns it from `new_matcher` until the request ends.

    Every step: `fill_bitmask` (allowed next tokens) -> sample -> `accept_token(sampled)`. A stop
    token (the tokenizer's EOS ids) is allowed exactly when the grammar is complete; accepting one
    makes `is_terminated()` true and the request must finish."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` without changing the state.

        bitmask: int32 [bs, ceil(vocab_size / 32)] on the CPU; token j is allowed iff bit j % 32
        of word j // 32 is set. Ids past the tokenizer's vocabulary are never allowed."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one token. False (and no state change) if the grammar does not allow it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """A stop token was accepted: the output is complete and nothing more may follow."""

    @abstractmethod
    def find_jump_forward(self) -> str:
        """The longest string every continuation starts with ("" when there is a choice), without
        changing the state. Jump-forward appends it without decoding."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (jump-forward retokenization needs it)."""

    def error(self) -> str | None:
        """Why the grammar engine gave up on this request (a size limit it hit while following the
        grammar), or None. Engines that never give up need not override it."""
        return None


class GrammarBackend(ABC):
    """Compiles constraints for one tokenizer. `compile` may run on any thread (the manager calls it
    from a worker pool); `new_matcher` and `fill_bitmasks` run on the scheduler thread.

    `vocab_size` is the model's (the logits' width); it may exceed the tokenizer's, and the extra
    ids are never allowed. `stop_token_ids` end a complete output (default: the tokenizer's EOS ids).
    """

    name: str

    def __init__(
        self, tokenizer: Any, vocab_size: int, *, stop_token_ids: list[int] | None = None, num_threads: int = 1
    ):
        self.hf = getattr(tokenizer, "hf", tokenizer)  # our Tokenizer wrapper, or a HF tokenizer
        if stop_token_ids is None:
            stop_token_ids = list(getattr(tokenizer, "eos_token_ids", None) or [self.hf.eos_token_id])
        assert stop_token_ids and all(0 <= t < vocab_size for t in stop_token_ids), stop_token_ids
        assert vocab_size >= len(self.hf), f"model vocab {vocab_size} < tokenizer vocab {len(self.hf)}"
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.num_threads = num_threads

    @classmethod
    @abstractmethod
    def check(cls, key: GrammarKey) -> None:
        """Parse `key.spec` without a tokenizer; raise GrammarError if it is invalid."""

    @abstractmethod
    def compile(self, key: GrammarKey) -> CompiledGrammar:
        """Build the token-level grammar; raise GrammarError if the spec is invalid."""

    @abstractmethod
    def new_matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        """A fresh matcher at the start of `compiled`."""

    def fill_bitmasks(self, rows: list[tuple[int, GrammarMatcher]], bitmask: torch.Tensor) -> None:
        """Fill `bitmask[row]` for each (row, matcher). Backends may do this in parallel."""
        for row, matcher in rows:
            matcher.fill_bitmask(bitmask, row)


# ---- helpers shared by the backends ----------------------------------------------------------------


def check_kind(key: GrammarKey) -> None:
    if key.kind not in KINDS:
        raise GrammarError(f"unknown constraint kind {key.kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(key.spec, str):
        raise GrammarError(f"{key.kind} must be a string, got {type(key.spec).__name__}")
    if key.kind != "json_object" and not key.spec:
        raise GrammarError(f"{key.kind} is empty")


def parse_json_schema(spec: str) -> dict[str, Any]:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    return schema


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("items", "prefixItems", "anyOf", "oneOf")
_SCHEMA_ONE = (
    "items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames"
)
_OPEN_OBJECT_KEYS = ("additionalProperties", "unevaluatedProperties", "patternProperties")


def close_objects(schema: Any, *, in_all_of: bool = False) -> Any:
    """A copy of the schema where every object that lists `properties` and says nothing about other
    properties gets `additionalProperties: false`, so the model cannot wander into keys nobody asked
    for (OpenAI's structured outputs require the same). Objects that list no properties stay free;
    `allOf` branches stay open (closing each would make them contradict one another). Both backends
    get this same schema, so they agree on what an object may contain."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(sub, in_all_of=True) for sub in out["allOf"]]
    if not in_all_of and isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN_OBJECT_KEYS):
        out["additionalProperties"] = False
    return out


def parse_structural_tag(spec: str) -> tuple[list[dict[str, Any]], list[str]] | None:
    """SGLang's format `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}` as
    (structures, triggers); None for anything else (xgrammar's own format)."""
    try:
        tag = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"structural_tag is not valid JSON: {e}") from None
    if not isinstance(tag, dict) or "structures" not in tag:
        return None
    structures, triggers = tag["structures"], tag.get("triggers", [])
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list):
        raise GrammarError("structural_tag needs a non-empty list `structures` and a list `triggers`")
    for s in structures:
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end"), str):
            raise GrammarError("each structural_tag structure needs string `begin` and `end` and a `schema`")
        if not isinstance(s.get("schema", {}), (dict, bool)):
            raise GrammarError("a structural_tag structure's `schema` must be a JSON schema object")
    return structures, [str(t) for t in triggers]


def parse_choices(spec: str) -> list[str]:
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"choices must be a JSON list of strings: {e}") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty JSON list of non-empty strings")
    return choices


def choices_to_ebnf(choices: list[str]) -> str:
    """`root ::= "a" | "b"`, each choice a GBNF string literal."""
    return "root ::= " + " | ".join(_gbnf_literal(c) for c in choices)


def _gbnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ord(ch) < 0x10000:
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}" if ord(ch) > 0xFFFF else f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


_NATIVE_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (?:Check failed: .*? is false: )?")


def clean_error(kind: str, error: BaseException) -> GrammarError:
    """A client-facing GrammarError from a backend exception (drops C++ file:line prefixes)."""
    lines = [_NATIVE_LOG_PREFIX.sub("", line).strip() for line in str(error).strip().splitlines()]
    message = " ".join(line for line in lines if line) or type(error).__name__
    return GrammarError(f"invalid {kind}: {message}")
