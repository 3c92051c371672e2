"""xgrammar: a pushdown automaton over the grammar with token masks precomputed per grammar position.

Every constraint kind first becomes a tokenizer-free `xgr.Grammar` (which is all `check` needs),
then `GrammarCompiler.compile_grammar` precomputes which tokens each position accepts. xgrammar's own
compile cache is off: the manager caches compiled grammars with a bound, xgrammar's is unbounded.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import torch
import xgrammar as xgr

from plait.runtime.constrained.base import (
    JSON_SEPARATORS,
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    GrammarKey,
    GrammarMatcher,
    check_kind,
    choices_to_ebnf,
    clean_error,
    close_objects,
    parse_choices,
    parse_json_schema,
    parse_structural_tag,
)


def _to_grammar(key: GrammarKey) -> xgr.Grammar:
    check_kind(key)
    kind, spec = key
    try:
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind in ("json_schema", "json_object"):
            schema = close_objects(parse_json_schema(spec)) if kind == "json_schema" else {"type": "object"}
            # close_objects decides which objects are closed; xgrammar's strict mode would also
            # close objects that list no properties (a bare {"type": "object"} would admit only {}).
            return xgr.Grammar.from_json_schema(
                json.dumps(schema), any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=False
            )
        if kind == "ebnf":
            return xgr.Grammar.from_ebnf(spec)
        if kind == "choices":
            return xgr.Grammar.from_ebnf(choices_to_ebnf(parse_choices(spec)))
        assert kind == "structural_tag"
        return _structural_tag_grammar(spec)
    except GrammarError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError/ValueError/its own types, all "invalid spec"
        raise clean_error(kind, e) from None


def _structural_tag_grammar(spec: str) -> xgr.Grammar:
    parsed = parse_structural_tag(spec)
    if parsed is None:
        return xgr.Grammar.from_structural_tag(spec)  # xgrammar's own structural-tag format
    structures, triggers = parsed
    items = [
        xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(close_objects(s.get("schema", {}))), end=s["end"])
        for s in structures
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return xgr.Grammar.from_structural_tag(items, triggers)


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher: xgr.GrammarMatcher):
        self._m = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def find_jump_forward(self) -> str:
        return self._m.find_jump_forward_string()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._m.rollback(num_tokens)


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(
        self, tokenizer: Any, vocab_size: int, *, stop_token_ids: list[int] | None = None, num_threads: int = 1
    ):
        super().__init__(tokenizer, vocab_size, stop_token_ids=stop_token_ids, num_threads=num_threads)
        info = xgr.TokenizerInfo.from_huggingface(self.hf, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=num_threads, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(num_threads) if num_threads > 1 else None

    @classmethod
    def check(cls, key: GrammarKey) -> None:
        _to_grammar(key)

    def compile(self, key: GrammarKey) -> CompiledGrammar:
        start = time.perf_counter()
        grammar = _to_grammar(key)
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except Exception as e:
            raise clean_error(key.kind, e) from None
        return CompiledGrammar(key, compiled, time.perf_counter() - start)

    def new_matcher(self, compiled: CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(xgr.GrammarMatcher(compiled.handle))

    def fill_bitmasks(self, rows: list[tuple[int, GrammarMatcher]], bitmask: torch.Tensor) -> None:
        if self._batch is None or len(rows) < 2:
            return super().fill_bitmasks(rows, bitmask)
        matchers = [m._m for _, m in rows]  # type: ignore[attr-defined]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, [row for row, _ in rows])
