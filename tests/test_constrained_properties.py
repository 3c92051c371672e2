"""Property tests of every grammar backend on the default tokenizer. They need no model: they walk a
grammar by sampling uniformly among the tokens the mask allows until the grammar accepts a stop token,
then check the text with a reference (Python's `re.fullmatch` for regexes, `jsonschema` for schemas,
`json` for JSON objects, a small recursive-descent parser for the EBNF grammar)."""

from __future__ import annotations

import json
import re

import jsonschema
from hypothesis import given
from hypothesis import strategies as st

from plait.runtime.constrained.base import GrammarKey, close_objects
from tests.constrained_support import ARITHMETIC, PROPERTY_SETTINGS, backend, random_walk  # noqa: F401 (fixtures)


# ---- property tests: random walks through the mask ---------------------------------------------
_ATOMS = ["a", "b", "z", "0", "7", " ", "_", "-", r"\.", r"\(", r"\+", "[a-c]", "[0-9]", "[xyz_]", r"\d", "é"]
_QUANTIFIERS = ["?", "*", "+", "{2}", "{0,2}", "{1,3}"]
regexes = st.recursive(
    st.sampled_from(_ATOMS),
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
        st.tuples(inner, st.sampled_from(_QUANTIFIERS)).map(lambda p: f"({p[0]}){p[1]}"),
    ),
    max_leaves=6,
)


@PROPERTY_SETTINGS
@given(regex=regexes, seed=st.integers(0, 2**16))
def test_random_walk_matches_regex(backend, regex, seed):
    text = random_walk(backend, GrammarKey("regex", regex), seed)
    assert re.fullmatch(regex, text), (regex, text)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(alphabet='ab"é\\ ', max_size=3))
_names = st.sampled_from(["a", "b", "id", "x_1", "é", "q r"])
_leaf_schemas = st.one_of(
    st.integers(0, 5).flatmap(
        lambda n: st.integers(0, n).map(lambda m: {"type": "string", "minLength": m, "maxLength": n})
    ),
    st.just({"type": "string", "pattern": "^[a-z]{1,3}-[0-9]{2}$"}),
    st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}
    ),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(_scalars, min_size=1, max_size=4, unique_by=json.dumps).map(lambda v: {"enum": v}),
)


def _objects(children):
    return st.dictionaries(_names, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required}
        )
    )


def _arrays(children):
    return st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
    )


_schemas = st.recursive(
    _leaf_schemas,
    lambda c: st.one_of(_objects(c), _arrays(c), st.lists(c, min_size=2, max_size=2).map(lambda xs: {"anyOf": xs})),
    max_leaves=5,
)
json_schemas = st.tuples(_schemas, _schemas).map(
    lambda t: {
        "$defs": {"d": t[0]},
        "type": "object",
        "properties": {"ref": {"$ref": "#/$defs/d"}, "other": t[1]},
        "required": ["ref"],
    }
)


@PROPERTY_SETTINGS
@given(schema=json_schemas, seed=st.integers(0, 2**16))
def test_random_walk_validates_json_schema(backend, schema, seed):
    text = random_walk(backend, GrammarKey("json_schema", json.dumps(schema)), seed)
    if backend.name == "xgrammar" and any(ord(c) < 0x20 for c in text):
        # xgrammar's JSON grammar lets raw control characters into strings, which strict JSON
        # forbids (docs/constrained.md); llguidance, the default backend, escapes them.
        instance = json.loads(text, strict=False)
    else:
        instance = json.loads(text)
    jsonschema.validate(instance, close_objects(schema))  # the closed schema implies the original


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16))
def test_random_walk_json_object(backend, seed):
    text = random_walk(backend, GrammarKey("json_object", ""), seed)
    assert isinstance(json.loads(text), dict), text


def parse_arithmetic(text: str) -> bool:
    """Recursive descent over ARITHMETIC; True iff the whole text parses."""
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if not factor():
            return False
        while pos < len(text) and text[pos] in "*/":
            pos += 1
            if not factor():
                return False
        return True

    def factor() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if not expr() or pos >= len(text) or text[pos] != ")":
                return False
            pos += 1
            return True
        start = pos
        while pos < len(text) and text[pos].isascii() and text[pos].isdigit():
            pos += 1
        return pos > start

    return expr() and pos == len(text)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16))
def test_random_walk_parses_ebnf(backend, seed):
    text = random_walk(backend, GrammarKey("ebnf", ARITHMETIC), seed)
    assert parse_arithmetic(text), text


@PROPERTY_SETTINGS
@given(
    choices=st.lists(st.text(alphabet='ab é"\n', min_size=1, max_size=4), min_size=1, max_size=4, unique=True),
    seed=st.integers(0, 2**16),
)
def test_random_walk_picks_a_choice(backend, choices, seed):
    assert random_walk(backend, GrammarKey("choices", json.dumps(choices)), seed) in choices
