"""A schema-driven fuzz of the HTTP API (used by test_request_path.py; no tests here).

Schemathesis reads the server's own /openapi.json, whose request-body schemas are the pydantic
models the server parses with, and generates bodies for every endpoint that takes one: valid ones
(positive mode) and ones that break the schema (negative mode: wrong types, missing fields, bytes
that are no JSON). `/generate` bodies also get sampling parameters drawn from the `SamplingParams`
dataclass itself, so they reach the checks behind the schema. Lengths are clamped so a run stays
short: the fuzz is about input, not decoding.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from plait.sampling_params import SamplingParams

MAX_TOKENS = 8
MAX_N = 3
LENGTH_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens", "min_new_tokens", "min_tokens")

SAMPLING = st.builds(SamplingParams, custom_params=st.none()).map(dataclasses.asdict)


def _clamp(value: Any) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in LENGTH_FIELDS and isinstance(v, int) and not isinstance(v, bool):
                v = max(min(v, MAX_TOKENS), -1)
            elif k == "n" and isinstance(v, int) and not isinstance(v, bool):
                v = min(v, MAX_N)
            out[k] = _clamp(v)
        return out
    if isinstance(value, list):
        return [_clamp(v) for v in value]
    return value


def _encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(_clamp(body), allow_nan=True).encode("utf-8", errors="surrogatepass")


def _post(url: str, data: bytes, timeout: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    return status, raw[:300]


def run_fuzz(url: str, spec: dict[str, Any], *, max_examples: int, time_budget_s: float
             ) -> list[tuple[str, Any, int, Any]]:
    """Up to `max_examples` bodies per endpoint and mode, within the time budget; every
    (path, body, status, answer) sent."""
    schema = schemathesis.openapi.from_dict(spec)
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if op.method.upper() == "POST" and op.body]
    results: list[tuple[str, Any, int, Any]] = []
    runs = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    per_run = time_budget_s / max(len(runs), 1)
    for op, mode in runs:
        stop_at = time.monotonic() + per_run
        cases = op.as_strategy(generation_mode=mode)
        if op.path == "/generate" and mode is GenerationMode.POSITIVE:
            cases = st.tuples(cases, SAMPLING, st.booleans())
        else:
            cases = st.tuples(cases, st.none(), st.just(False))

        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(cases)
        def send(drawn: tuple) -> None:
            case, sampling, use_sampling = drawn
            if time.monotonic() > stop_at:
                return
            body = case.body
            if use_sampling and isinstance(body, dict):
                body = {**body, "sampling_params": sampling}
            status, answer = _post(url + op.path, _encode(body))
            results.append((op.path, body, status, answer))

        send()
    return results
