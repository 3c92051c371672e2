"""Constrained decoding through the Engine: every output valid under sampling at temperature 1
(generated regexes and JSON schemas, tiny random model and the default model), truncation says
`length`, jump-forward saves decode steps without changing greedy text, and the scheduler keeps
serving while a slow grammar compiles."""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plait.runtime.engine import Engine
from tests.test_constrained_properties import json_schemas, regexes
from tests.tiny_models import InMemorySource

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def tiny_engine(default_tokenizer):
    cfg = transformers.LlamaConfig(
        vocab_size=len(default_tokenizer.hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with Engine(source=InMemorySource(hf, tokenizer=default_tokenizer), dtype="float32", device="cpu",
                max_total_tokens=8192, debug_check_integrity=True) as engine:
        yield engine


def check_output(result: dict, *, max_new_tokens: int, validate) -> None:
    reason = result["meta_info"]["finish_reason"]
    assert reason["type"] in ("stop", "length"), reason
    if reason["type"] == "length":
        assert result["meta_info"]["completion_tokens"] == max_new_tokens
    else:
        validate(result["text"])


@SETTINGS
@given(regex=regexes, seed=st.integers(0, 1000))
def test_tiny_model_regex_outputs_match(tiny_engine, regex, seed):
    r = tiny_engine.generate("Text:", {"max_new_tokens": 64, "temperature": 1.0, "seed": seed, "regex": regex})
    check_output(r, max_new_tokens=64, validate=lambda text: re.fullmatch(regex, text) or pytest.fail(f"{regex!r} {text!r}"))


@SETTINGS
@given(schema=json_schemas, seed=st.integers(0, 1000))
def test_tiny_model_json_outputs_validate(tiny_engine, schema, seed):
    params = {"max_new_tokens": 96, "temperature": 1.0, "seed": seed, "json_schema": json.dumps(schema)}
    r = tiny_engine.generate("JSON:", params)
    check_output(r, max_new_tokens=96, validate=lambda text: jsonschema.validate(json.loads(text), schema))


def test_truncated_output_says_length(tiny_engine):
    r = tiny_engine.generate("x", {"max_new_tokens": 3, "temperature": 1.0, "regex": "[a-z]{20}"})
    assert r["meta_info"]["finish_reason"]["type"] == "length" and r["meta_info"]["completion_tokens"] == 3
    assert re.fullmatch("[a-z]*", r["text"])


def test_bad_constraints_are_rejected_with_reasons(tiny_engine):
    from plait.runtime.frontend.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="regex"):
        tiny_engine.generate("x", {"regex": "([0-9"})
    with pytest.raises(InvalidRequestError, match="json"):
        tiny_engine.generate("x", {"json_schema": "{not json"})
    # The scheduler is still serving.
    assert tiny_engine.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_mixed_batch_constrained_and_free(tiny_engine):
    params = [{"max_new_tokens": 20, "temperature": 1.0, "regex": "(yes|no)"}, {"max_new_tokens": 20, "ignore_eos": True}]
    constrained, free = tiny_engine.generate(["a", "b"], params)
    assert constrained["text"] in ("yes", "no")
    assert free["meta_info"]["completion_tokens"] == 20


def test_scheduler_serves_while_a_slow_grammar_compiles(default_tokenizer, monkeypatch):
    """A grammar that takes seconds to compile (older xgrammar releases took that long on bounded
    string lengths; newer ones are fast, so the compile is slowed here): unconstrained requests must
    not wait for it."""
    cfg = transformers.LlamaConfig(
        vocab_size=len(default_tokenizer.hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    props = {f"field_{i}": {"type": "string", "minLength": 1, "maxLength": 40 + i} for i in range(12)}
    schema = {"type": "object", "properties": props, "required": list(props)}
    with Engine(source=InMemorySource(hf, tokenizer=default_tokenizer), dtype="float32", device="cpu",
                max_total_tokens=4096, grammar_backend="xgrammar") as engine:
        backend = engine.scheduler.constraints.manager.backend  # built now; only the compile is slow
        compile_grammar = backend.compile

        def slow_compile(key):
            time.sleep(2.0)
            return compile_grammar(key)

        monkeypatch.setattr(backend, "compile", slow_compile)
        done = {}

        def slow():
            engine.generate("x", {"max_new_tokens": 8, "json_schema": json.dumps(schema)})
            done["slow"] = time.perf_counter()

        thread = threading.Thread(target=slow)
        start = time.perf_counter()
        thread.start()
        time.sleep(0.05)
        for _ in range(5):
            r = engine.generate("free", {"max_new_tokens": 4, "ignore_eos": True})
            assert r["meta_info"]["completion_tokens"] == 4
        free_done = time.perf_counter()
        thread.join(timeout=300)
        assert "slow" in done
        # Five unconstrained requests finished before the one waiting on its grammar.
        assert free_done < done["slow"], (free_done - start, done["slow"] - start)


@pytest.mark.slow
def test_default_model_json_and_jump_forward(default_tokenizer):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        },
        "required": ["name", "age", "city"],
    }
    with Engine(dtype="float32", max_total_tokens=8192) as engine:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
        greedy = {"max_new_tokens": 80, "temperature": 0, "json_schema": json.dumps(schema)}
        steps = {}
        texts = {}
        for jump in (True, False):
            engine.scheduler.constraints.jump_forward = jump
            before = engine.scheduler.stats["decode_steps"]
            r = engine.generate(prompt, greedy)
            steps[jump] = engine.scheduler.stats["decode_steps"] - before
            texts[jump] = r["text"]
            jsonschema.validate(json.loads(r["text"]), schema)
        assert texts[True] == texts[False]
        assert steps[True] < steps[False]
        engine.scheduler.constraints.jump_forward = True
        results = engine.generate([prompt] * 4, [{**greedy, "temperature": 1.0, "seed": s} for s in range(4)])
        for r in results:
            check_output(r, max_new_tokens=80, validate=lambda text: jsonschema.validate(json.loads(text), schema))
        r = engine.generate(prompt, {"max_new_tokens": 40, "temperature": 1.0, "regex": r"[A-Z][a-z]{2,8} is [0-9]{1,2}"})
        check_output(r, max_new_tokens=40, validate=lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} is [0-9]{1,2}", t) or pytest.fail(t))


@pytest.fixture(scope="module")
def default_engine():
    with Engine(dtype="bfloat16", max_total_tokens=8192) as engine:
        yield engine


DEFAULT_SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.slow
@DEFAULT_SETTINGS
@given(regex=regexes, seed=st.integers(0, 1000))
def test_default_model_regex_property(default_engine, regex, seed):
    r = default_engine.generate("Write it:", {"max_new_tokens": 32, "temperature": 1.0, "seed": seed, "regex": regex})
    check_output(r, max_new_tokens=32, validate=lambda text: re.fullmatch(regex, text) or pytest.fail(f"{regex!r} {text!r}"))


@pytest.mark.slow
@DEFAULT_SETTINGS
@given(schema=json_schemas, seed=st.integers(0, 1000))
def test_default_model_json_schema_property(default_engine, schema, seed):
    params = {"max_new_tokens": 64, "temperature": 1.0, "seed": seed, "json_schema": json.dumps(schema)}
    r = default_engine.generate("JSON:", params)
    check_output(r, max_new_tokens=64, validate=lambda text: jsonschema.validate(json.loads(text), schema))


def test_stop_string_ends_a_constrained_request(tiny_engine):
    """Stop conditions apply to constrained requests too: a stop string ends the request (and is
    trimmed) even where the grammar would go on; the text before it still follows the grammar."""
    free = tiny_engine.generate("x", {"max_new_tokens": 24, "temperature": 0, "regex": "[a-c]{6}-[a-c]{6}"})
    assert re.fullmatch("[a-c]{6}-[a-c]{6}", free["text"])
    out = tiny_engine.generate("x", {"max_new_tokens": 24, "temperature": 0, "regex": "[a-c]{6}-[a-c]{6}", "stop": ["-"]})
    assert out["text"] == free["text"].split("-")[0]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "-"}
