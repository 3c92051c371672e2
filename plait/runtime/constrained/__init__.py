"""Constrained decoding: regex / JSON schema / EBNF / choices -> per-step token masks, plus jump-forward.

`base` (the interface, the backend registry, no heavy imports), one module per grammar library
(`xgrammar_backend`, `llguidance_backend`), `manager` (async compile cache and batch masks, owned by
the scheduler) and `jump_forward` (forced strings and boundary retokenization). docs/constrained.md
has the measurements behind the default backend.
"""

from plait.runtime.constrained.base import (
    DEFAULT_GRAMMAR_BACKEND,
    GRAMMAR_BACKENDS,
    KINDS,
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    GrammarKey,
    GrammarMatcher,
    grammar_key,
    validate_constraint,
)

__all__ = [
    "DEFAULT_GRAMMAR_BACKEND",
    "GRAMMAR_BACKENDS",
    "KINDS",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarError",
    "GrammarKey",
    "GrammarMatcher",
    "grammar_key",
    "validate_constraint",
]
