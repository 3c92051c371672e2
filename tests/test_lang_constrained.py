"""Constraints from the frontend reach the runtime and hold: `gen(regex=...)`, `gen(json_schema=...)`,
`gen(dtype=int)`, `gen_int` and `gen(choices=...)` on a tiny random model sampling at temperature 1."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import plait as sgl
from plait.lang.backend.engine_backend import EngineBackend
from tests.test_lang_engine import tiny_engine


@pytest.fixture(scope="module")
def backend(default_tokenizer):
    return EngineBackend.for_engine(tiny_engine(default_tokenizer))


SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
          "required": ["id", "tag"]}


@sgl.function
def constrained(s):
    s += "Code: " + sgl.gen("code", regex=r"[A-Z]{2}-[0-9]{3}", max_tokens=16, temperature=1.0)
    s += "\nCount: " + sgl.gen("count", dtype=int, max_tokens=8, temperature=1.0)
    s += "\nNumber: " + sgl.gen_int("number", max_tokens=8)
    s += "\nRecord: " + sgl.gen("record", json_schema=json.dumps(SCHEMA), max_tokens=48, temperature=1.0)
    s += "\nPick: " + sgl.gen("pick", choices=["red", "green", "blue"])


@pytest.mark.parametrize("seed", range(3))
def test_frontend_constraints_hold(backend, seed):
    state = constrained.run(backend=backend, seed=seed)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", state["code"]), state["code"]
    assert re.fullmatch(r"-?[0-9]+", str(state["count"])), state["count"]  # SGLang keeps the text
    assert re.fullmatch(r"-?[0-9]+", str(state["number"])), state["number"]
    jsonschema.validate(json.loads(state["record"]), SCHEMA)
    assert state["pick"] in ("red", "green", "blue")
