"""Constrained decoding on the default tokenizer, for every grammar backend: grammar keys, validation of
constraint specs, and fixed examples of each kind (JSON schema, JSON object, regex, EBNF, choices,
structural tags), termination and rollback."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from plait.runtime.constrained.base import (
    DEFAULT_GRAMMAR_BACKEND,
    GRAMMAR_BACKENDS,
    GrammarError,
    GrammarKey,
    backend_class,
    close_objects,
    grammar_key,
    validate_constraint,
)
from plait.sampling_params import SamplingParams
from tests.constrained_support import ARITHMETIC, BACKENDS, backend, encode, accepts  # noqa: F401 (fixtures)


# ---- keys and validation ---------------------------------------------------------------------------
def test_grammar_key_from_params():
    assert grammar_key(SamplingParams()) is None
    assert grammar_key(SamplingParams(regex="a+")) == GrammarKey("regex", "a+")
    schema = '{"type": "string"}'
    assert grammar_key(SamplingParams(json_schema=schema)) == GrammarKey("json_schema", schema)
    assert grammar_key(SamplingParams(json_schema="$$ANY$$")) == GrammarKey("json_object", "")
    assert grammar_key(SamplingParams(ebnf='root ::= "x"')) == GrammarKey("ebnf", 'root ::= "x"')
    assert grammar_key(SamplingParams(structural_tag="{}")) == GrammarKey("structural_tag", "{}")
    assert DEFAULT_GRAMMAR_BACKEND in GRAMMAR_BACKENDS


BAD_SPECS = [
    (SamplingParams(regex="(abc"), "regex"),
    (SamplingParams(regex="a(?=b)"), "regex"),
    (SamplingParams(json_schema='{"type": '), "not valid JSON"),
    (SamplingParams(json_schema="[1, 2]"), "must be a JSON object"),
    (SamplingParams(json_schema='{"type": "objec"}'), "objec"),
    (SamplingParams(ebnf='root ::= "a" ('), "ebnf"),
    (SamplingParams(structural_tag='{"structures": "x"}'), "structural_tag"),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("params, needle", BAD_SPECS)
def test_validate_constraint_rejects_bad_specs(name, params, needle):
    with pytest.raises(GrammarError, match=re.escape(needle)) as info:
        validate_constraint(params, name)
    assert isinstance(info.value, ValueError)
    assert not str(info.value).startswith("["), "native log prefixes are stripped"


@pytest.mark.parametrize("name", BACKENDS)
def test_validate_constraint_accepts_good_specs(name):
    for params in (
        SamplingParams(),
        SamplingParams(regex=r"\d{3}-[a-z]+"),
        SamplingParams(json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}}'),
        SamplingParams(json_schema="$$ANY$$"),
        SamplingParams(ebnf='root ::= "a" [0-9]+'),
    ):
        validate_constraint(params, name)


def test_compile_errors_are_grammar_errors(backend):
    for key in (GrammarKey("regex", "(abc"), GrammarKey("json_schema", '{"type": 3}'), GrammarKey("choices", "[]")):
        with pytest.raises(GrammarError):
            backend.compile(key)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="choose from"):
        backend_class("nope")


def test_close_objects_closes_listed_properties_only():
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a property named "properties"
            "free": {"type": "object"},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "list": {"type": "array", "items": {"properties": {"y": {}}}},
        },
        "$defs": {"d": {"properties": {"z": {}}}},
        "allOf": [{"properties": {"a": {}}}],
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert set(props) == {"properties", "free", "open", "list"}
    assert props["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in props["free"]
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]
    assert "additionalProperties" not in schema, "the input is not modified"


# ---- each kind: fixed examples ------------------------------------------------------------------------
PERSON = {
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        }
    },
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "home": {"$ref": "#/$defs/address"},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "role", "tags", "home"],
}
GOOD_PERSONS = [
    {"name": "Ann", "age": 30, "role": "admin", "tags": [], "home": {"city": "Oslo", "zip": "01234"}},
    {
        "name": "Bo",
        "age": 0,
        "role": "user",
        "tags": ["x", "y z"],
        "home": {"city": "", "zip": "99999"},
        "born": "2001-02-03",
    },
]
BAD_CHANGES = {  # what breaks: the change to GOOD_PERSONS[0]
    "minLength": {"name": "A"},
    "maxLength": {"name": "Annabel"},
    "maximum": {"age": 151},
    "enum": {"role": "root"},
    "maxItems": {"tags": ["a", "b", "c"]},
    "pattern under $ref": {"home": {"city": "Oslo", "zip": "1234"}},
    "required under $ref": {"home": {"city": "Oslo"}},
    "closed object": {"x": 1},
    "date format": {"born": "2001-13-01"},
}


def test_json_schema_examples(backend):
    key = GrammarKey("json_schema", json.dumps(PERSON))
    for person in GOOD_PERSONS:
        jsonschema.validate(person, PERSON)
        assert accepts(backend, key, json.dumps(person)), person
    for why, change in BAD_CHANGES.items():
        assert not accepts(backend, key, json.dumps({**GOOD_PERSONS[0], **change})), why
    missing = {k: v for k, v in GOOD_PERSONS[0].items() if k != "home"}
    assert not accepts(backend, key, json.dumps(missing)), "required"
    assert not accepts(backend, key, json.dumps(GOOD_PERSONS[0], indent=2)), "only compact JSON"
    assert not accepts(backend, key, json.dumps(GOOD_PERSONS[0], separators=(",", ":")))


def test_json_object_without_schema(backend):
    key = GrammarKey("json_object", "")
    assert accepts(backend, key, '{"a": [1, 2.5, null, true], "b": {"c": "d"}}')
    assert accepts(backend, key, "{}")
    for text in ("[1, 2]", '"str"', "{", '{"a" 1}'):
        assert not accepts(backend, key, text), text


def test_regex_examples(backend):
    key = GrammarKey("regex", r"(\+\d{1,3} )?\(\d{3}\) \d{3}-\d{4}")
    assert accepts(backend, key, "(555) 123-4567")
    assert accepts(backend, key, "+44 (555) 123-4567")
    assert not accepts(backend, key, "555-123-4567")
    assert not accepts(backend, key, "(555) 123-4567 ")


def test_ebnf_examples(backend):
    key = GrammarKey("ebnf", ARITHMETIC)
    for text in ("1", "(1+2)*3", "12/(3-4)*5"):
        assert accepts(backend, key, text), text
    for text in ("(1+2", "1+", "a", "1 + 2"):
        assert not accepts(backend, key, text), text


def test_choices_examples(backend):
    choices = ["yes", "no", 'say "hi"\n', "é\\"]
    key = GrammarKey("choices", json.dumps(choices))
    for choice in choices:
        assert accepts(backend, key, choice), choice
    for text in ("ye", "yes!", "No", ""):
        assert not accepts(backend, key, text), text


def test_structural_tag(backend):
    tag = {
        "structures": [
            {
                "begin": "<function=weather>",
                "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                "end": "</function>",
            }
        ],
        "triggers": ["<function="],
    }
    key = GrammarKey("structural_tag", json.dumps(tag))
    assert accepts(backend, key, "Let me look. ")
    assert accepts(backend, key, 'Let me look. <function=weather>{"city": "Paris"}</function> Done.')
    assert not accepts(backend, key, 'Let me look. <function=weather>{"town": "Paris"}</function>')


def test_termination_and_rollback(backend):
    matcher = backend.new_matcher(backend.compile(GrammarKey("regex", "ab+")))
    stop = backend.stop_token_ids[0]
    assert not matcher.accept_token(stop), "the grammar is not complete yet"
    for t in encode(backend.hf, "abb"):
        assert matcher.accept_token(t)
    assert not matcher.is_terminated()
    assert matcher.accept_token(stop) and matcher.is_terminated()
    assert not matcher.accept_token(encode(backend.hf, "b")[0]), "nothing after the stop token"
    matcher.rollback(1)
    assert not matcher.is_terminated()
    assert matcher.accept_token(encode(backend.hf, "b")[0])
    assert not matcher.accept_token(len(backend.hf) + 3), "ids past the tokenizer are refused"
