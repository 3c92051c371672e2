"""llguidance: an Earley parser over lazily built lexer automata; masks are computed on demand.

(We call the matcher's mask-into-pointer API directly: `llguidance.torch` would import
torch._dynamo, several seconds, for a `torch.compile`d helper we do not use.)

Compiling only parses and validates the grammar (cheap even for huge schemas); the token-level work
happens at the first masks of each request. A compiled grammar is a template matcher that every
request deep-copies. llguidance matchers never raise on bad tokens but enter a permanent error
state, so `accept_token` uses `try_consume_tokens`, which refuses a token without that, to keep
our "False and unchanged" contract.
"""

from __future__ import annotations

import json
import time
from typing import Any

import llguidance
import llguidance.hf
import torch

from plait.runtime.constrained.base import (
    JSON_SEPARATORS,
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    GrammarKey,
    GrammarMatcher,
    check_kind,
    close_objects,
    parse_choices,
    parse_json_schema,
    parse_structural_tag,
)

_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": JSON_SEPARATORS[0],
    "key_separator": JSON_SEPARATORS[1],
}


def _to_grammar(key: GrammarKey) -> str:
    """The llguidance grammar (its JSON format) for a key; not yet validated."""
    check_kind(key)
    kind, spec = key
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "json_schema":
        schema = close_objects(parse_json_schema(spec))
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if kind == "ebnf":
        return _from_gbnf(spec)
    if kind == "choices":
        # Lark string literals take JSON escapes (the GBNF converter mangles \\u escapes).
        alternatives = " | ".join(json.dumps(c) for c in parse_choices(spec))
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    assert kind == "structural_tag"
    return _structural_tag(spec)


def _structural_tag(spec: str) -> str:
    """Free text until a trigger, then `begin` + JSON under the schema + `end`, any number of times."""
    parsed = parse_structural_tag(spec)
    if parsed is None:
        raise GrammarError('llguidance takes structural_tag only as {"structures": [...], "triggers": [...]}')
    structures, triggers = parsed
    tags = []
    for s in structures:
        trigger = max((t for t in triggers if t and s["begin"].startswith(t)), key=len, default=None)
        if trigger is None:
            raise GrammarError(f"structural_tag: no trigger starts the begin string {s['begin']!r}")
        schema = close_objects(s.get("schema", {}))
        schema = {**schema, "x-guidance": _JSON_OPTIONS} if isinstance(schema, dict) else schema
        tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=schema, end=s["end"]))
    return llguidance.StructTag.to_grammar(tags, assume_special=False)


def _from_gbnf(spec: str) -> str:
    try:
        return llguidance.grammar_from("gbnf", spec)
    except Exception as e:  # the GBNF-to-Lark converter raises plain exceptions on syntax errors
        raise GrammarError(f"invalid ebnf: {e}") from None


def _validate(kind: str, grammar: str, tokenizer: llguidance.LLTokenizer | None) -> None:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise GrammarError(f"invalid {kind}: {' '.join(messages[0].split())}")


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher, stop_token_ids: frozenset[int]):
        self._m = matcher
        self._stop_token_ids = stop_token_ids
        self._terminated = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        _check_bitmask(bitmask)
        self._m.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), bitmask.shape[1] * 4)

    def accept_token(self, token_id: int) -> bool:
        if self._terminated:
            return False
        if token_id in self._stop_token_ids:
            # try_consume_tokens does not count a stop token the grammar could still go on past.
            if not self._m.is_accepting():
                return False
            ok = self._m.consume_token(token_id)
            assert ok, self._m.get_error()
            self._terminated = True
            return True
        # try_consume_tokens refuses without entering the error state (consume_token would not).
        return self._m.try_consume_tokens([token_id]) == 1

    def is_terminated(self) -> bool:
        return self._terminated

    def find_jump_forward(self) -> str:
        forced = self._m.compute_ff_bytes()
        for cut in range(4):  # forced bytes may end inside a UTF-8 character
            try:
                return forced[: len(forced) - cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
        return ""

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            assert self._m.rollback(num_tokens), self._m.get_error()
            self._terminated = False

    def error(self) -> str | None:
        if not self._m.is_error():
            return None
        # The first line; the rest is a dump of the parser's state.
        return next((line.strip() for line in self._m.get_error().splitlines() if line.strip()), "unknown error")


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(
        self, tokenizer: Any, vocab_size: int, *, stop_token_ids: list[int] | None = None, num_threads: int = 1
    ):
        super().__init__(tokenizer, vocab_size, stop_token_ids=stop_token_ids, num_threads=num_threads)
        self._tokenizer = llguidance.hf.from_tokenizer(self.hf, n_vocab=vocab_size, eos_token=self.stop_token_ids)
        self._stop = frozenset(self.stop_token_ids)
        self._executor = llguidance.LLExecutor(num_threads) if num_threads > 1 else None

    @classmethod
    def check(cls, key: GrammarKey) -> None:
        _validate(key.kind, _to_grammar(key), None)

    def compile(self, key: GrammarKey) -> CompiledGrammar:
        start = time.perf_counter()
        grammar = _to_grammar(key)
        _validate(key.kind, grammar, self._tokenizer)
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(f"invalid {key.kind}: {template.get_error()}")
        return CompiledGrammar(key, template, time.perf_counter() - start)

    def new_matcher(self, compiled: CompiledGrammar) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(compiled.handle.deep_copy(), self._stop)

    def fill_bitmasks(self, rows: list[tuple[int, GrammarMatcher]], bitmask: torch.Tensor) -> None:
        if self._executor is None or len(rows) < 2:
            return super().fill_bitmasks(rows, bitmask)
        _check_bitmask(bitmask)
        pairs = [(m._m, row) for row, m in rows]  # type: ignore[attr-defined]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def _check_bitmask(bitmask: torch.Tensor) -> None:
    # llguidance writes through a raw pointer: the layout must be exactly what it assumes.
    assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.dim() == 2
    assert bitmask.is_contiguous()

