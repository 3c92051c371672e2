"""Grammar backends compared on the default model's tokenizer: compile time and per-token mask cost.

    python -m plait.bench.grammar
    python -m plait.bench.grammar --backends xgrammar llguidance --repeat 5 --result-file grammar.jsonl

Cases: a regex, a small EBNF grammar, a medium JSON schema (12 properties, a nested object, an array
of objects, enums) and a large one (50 properties over nested objects, arrays, enums, string formats
and `$ref`s to `$defs`). For each backend and case:

- `check`: the tokenizer-free parse `validate_constraint` runs at the HTTP layer;
- `compile`: `backend.compile` from scratch (median of `--repeat`; no cache anywhere);
- `stall`: the longest the calling thread could not run Python while the compile ran on another
  thread (a compile that holds the GIL stalls the scheduler loop for that long);
- `first mask`, `mask mean / max`: `fill_bitmask` while walking the canonical tokens of a valid
  instance (lazy backends pay at the first masks), then `accept_token`; each position's time is the
  minimum over the repeats (each on a fresh compile), which filters out preemption on a busy machine;
- `walk`: compile + every mask and accept of the instance, i.e. the grammar's total cost for one request.

`outlines` is outlines-core (regex and JSON schema only, through its JSON-to-regex conversion; each
compile runs in a child process killed after `--outlines-timeout` seconds). One CPU thread throughout.
Last, per backend: one step's masks for 32 rows of the medium schema, the packed fill alone and the
whole `GrammarManager.batch_mask` (fill + unpack to bool on the CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import queue as queue_module
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch

from plait.runtime.constrained.base import GrammarKey, GrammarMatcher, backend_class
from plait.runtime.constrained.manager import GrammarManager, bitmask_width

REGEX = r"\d{4}-(0[1-9]|1[0-2])-\d{2}T\d{2}:\d{2}:\d{2}Z [a-z][a-z0-9._]{0,15}@[a-z]{2,12}\.(com|org|net|io)"
REGEX_SAMPLE = "2024-05-17T09:30:00Z ada.lovelace@example.org"

EBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+
"""
EBNF_SAMPLE = "(12+7)*3-(4/(2+2))"

MEDIUM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "email": {"type": "string", "format": "email"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
        },
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "qty": {"type": "integer", "minimum": 1},
                },
                "required": ["sku", "qty"],
            },
        },
        "created": {"type": "string", "format": "date"},
        "notes": {"type": ["string", "null"]},
        "priority": {"enum": [1, 2, 3]},
    },
    "required": [
        "id", "name", "email", "active", "role", "score", "tags", "address", "orders", "created", "notes", "priority"
    ],
}
MEDIUM_INSTANCE: dict[str, Any] = {
    "id": 42,
    "name": "Ada Lovelace",
    "email": "ada@example.org",
    "active": True,
    "role": "editor",
    "score": 97.5,
    "tags": ["math", "engines"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
    "orders": [{"sku": "ABC-1234", "qty": 2}, {"sku": "XYZ-0001", "qty": 1}],
    "created": "1843-07-10",
    "notes": None,
    "priority": 2,
}

_DEFS: dict[str, Any] = {
    "address": {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 80},
            "city": {"type": "string", "maxLength": 40},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["US", "UK", "FR", "DE", "JP"]},
        },
        "required": ["street", "city", "zip", "country"],
    },
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "email": {"type": "string", "format": "email"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {"$ref": "#/$defs/address"},
        },
        "required": ["name", "email", "age", "address"],
    },
    "item": {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 999},
            "price": {"type": "number", "minimum": 0},
            "labels": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        },
        "required": ["sku", "qty", "price", "labels"],
    },
}
_ADDRESS = {"street": "1 Main St", "city": "Springfield", "zip": "01234", "country": "US"}
_PERSON = {"name": "Grace Hopper", "email": "grace@navy.mil", "age": 85, "address": _ADDRESS}
_ITEM = {"sku": "QRS-0042", "qty": 3, "price": 9.99, "labels": ["blue", "large"]}

# (property schema, instance value), cycled over the large schema's properties.
_LARGE_FIELDS: list[tuple[dict[str, Any], Any]] = [
    ({"type": "string", "maxLength": 60}, "a short free-text value"),
    ({"type": "integer", "minimum": -1000, "maximum": 1000}, 417),
    ({"type": "number"}, 3.25),
    ({"type": "boolean"}, False),
    ({"enum": ["red", "green", "blue", "cyan", "magenta", "yellow"]}, "cyan"),
    ({"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6}, ["x", "yz"]),
    ({"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 4}, [_ITEM]),
    ({"$ref": "#/$defs/person"}, _PERSON),
    ({"$ref": "#/$defs/address"}, _ADDRESS),
    ({"type": "string", "format": "date"}, "2023-11-05"),
    (
        {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}, "label": {"type": "string"}},
            "required": ["lat", "lon", "label"],
        },
        {"lat": 48.85, "lon": 2.35, "label": "Paris"},
    ),
    ({"type": "string", "minLength": 2, "maxLength": 8}, "abcd"),
]


def large_schema(num_properties: int = 50) -> tuple[dict[str, Any], dict[str, Any]]:
    """A schema of `num_properties` properties (two in three required) and a valid instance."""
    properties, instance, required = {}, {}, []
    for i in range(num_properties):
        schema, value = _LARGE_FIELDS[i % len(_LARGE_FIELDS)]
        name = f"field_{i:02d}"
        properties[name] = schema
        instance[name] = value
        if i % 3 != 2:
            required.append(name)
    schema = {"$defs": _DEFS, "type": "object", "properties": properties, "required": required}
    return schema, instance


class Case(NamedTuple):
    name: str
    key: GrammarKey
    sample: str  # a text the constraint accepts, walked token by token


def cases() -> list[Case]:
    large, large_instance = large_schema()
    return [
        Case("regex (date + email)", GrammarKey("regex", REGEX), REGEX_SAMPLE),
        Case("ebnf (arithmetic)", GrammarKey("ebnf", EBNF), EBNF_SAMPLE),
        Case(
            "json medium (12 props)", GrammarKey("json_schema", json.dumps(MEDIUM_SCHEMA)), json.dumps(MEDIUM_INSTANCE)
        ),
        Case("json large (50 props, $ref)", GrammarKey("json_schema", json.dumps(large)), json.dumps(large_instance)),
    ]


class Row(NamedTuple):
    backend: str
    case_name: str
    check_ms: float
    compile_ms: float
    stall_ms: float
    first_mask_us: float
    mask_mean_us: float
    mask_max_us: float
    walk_ms: float
    tokens: int


def max_stall_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run `fn` on a thread; meanwhile spin here and return the longest gap between two iterations."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(fn()))
    last = time.perf_counter()
    worst = 0.0
    worker.start()
    while worker.is_alive():
        now = time.perf_counter()
        worst = max(worst, now - last)
        last = now
    worker.join()
    return worst * 1e3, result[0]


def walk(matcher_fill: Callable[[], None], accept: Callable[[int], bool], ids: list[int]) -> list[float]:
    """Seconds per mask along `ids` (accepting each), plus the mask before the stop token."""
    times = []
    for token_id in ids + [None]:
        start = time.perf_counter()
        matcher_fill()
        times.append(time.perf_counter() - start)
        if token_id is not None:
            assert accept(token_id), f"the sample was refused at token {token_id}"
    return times


def measure_backend(backend: Any, case: Case, ids: list[int], repeat: int) -> Row:
    check = []
    for _ in range(repeat):
        start = time.perf_counter()
        type(backend).check(case.key)
        check.append(time.perf_counter() - start)
    compile_s = [backend.compile(case.key).compile_s for _ in range(repeat)]
    stall_ms, compiled = max_stall_ms(lambda: backend.compile(case.key))
    walks, runs = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        compiled = backend.compile(case.key)
        matcher: GrammarMatcher = backend.new_matcher(compiled)
        bitmask = torch.zeros(1, bitmask_width(backend.vocab_size), dtype=torch.int32)
        runs.append(walk(partial(matcher.fill_bitmask, bitmask, 0), matcher.accept_token, ids))
        assert matcher.accept_token(backend.stop_token_ids[0]) and matcher.is_terminated()
        walks.append(time.perf_counter() - start)
    masks = [min(times) for times in zip(*runs)]  # per position, the least disturbed of the repeats
    return Row(
        backend.name,
        case.name,
        check_ms=statistics.median(check) * 1e3,
        compile_ms=statistics.median(compile_s) * 1e3,
        stall_ms=stall_ms,
        first_mask_us=masks[0] * 1e6,
        mask_mean_us=statistics.mean(masks) * 1e6,
        mask_max_us=max(masks) * 1e6,
        walk_ms=statistics.median(walks) * 1e3,
        tokens=len(ids),
    )


# ---- outlines-core (compile in a child process: large schemas can take minutes) --------------------


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE spells byte b as a printable character; this maps those characters back."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _outlines_vocabulary(hf: Any, eos_token_id: int) -> Any:
    import outlines_core

    decoder = _gpt2_byte_decoder()
    special = set(hf.all_special_ids)
    tokens: dict[bytes, list[int]] = {}
    for piece, token_id in hf.get_vocab().items():
        if token_id in special or not all(c in decoder for c in piece):
            continue
        tokens.setdefault(bytes(decoder[c] for c in piece), []).append(token_id)
    return outlines_core.Vocabulary(eos_token_id, tokens)


def _outlines_child(hf: Any, eos_token_id: int, case: Case, ids: list[int], queue: Any) -> None:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary = _outlines_vocabulary(hf, eos_token_id)
    start = time.perf_counter()
    regex = case.key.spec if case.key.kind == "regex" else build_regex_from_schema(case.key.spec, r"[ ]?")
    index = outlines_core.Index(regex, vocabulary)
    compile_s = time.perf_counter() - start
    guide = outlines_core.Guide(index)
    mask = torch.zeros(bitmask_width(len(hf)), dtype=torch.int32)
    masks = walk(
        lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4),
        lambda t: guide.advance(t, return_tokens=False) is None,
        ids,
    )
    queue.put((compile_s, masks))


def measure_outlines(hf: Any, eos_token_id: int, case: Case, ids: list[int], timeout_s: float) -> Row | str:
    if case.key.kind not in ("regex", "json_schema"):
        return "n/a"
    if importlib.util.find_spec("outlines_core") is None:
        return "not installed"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_outlines_child, args=(hf, eos_token_id, case, ids, queue))
    child.start()
    try:
        compile_s, masks = queue.get(timeout=timeout_s)
    except queue_module.Empty:
        child.terminate()
        child.join()
        return f"> {timeout_s:.0f} s"
    child.join()
    return Row(
        "outlines-core",
        case.name,
        check_ms=float("nan"),
        compile_ms=compile_s * 1e3,
        stall_ms=float("nan"),
        first_mask_us=masks[0] * 1e6,
        mask_mean_us=statistics.mean(masks) * 1e6,
        mask_max_us=max(masks) * 1e6,
        walk_ms=(compile_s + sum(masks)) * 1e3,
        tokens=len(ids),
    )


def measure_batch(tokenizer: Any, backend_name: str, batch_size: int, repeat: int) -> tuple[float, float]:
    """Milliseconds for one batch of `batch_size` medium-schema rows at different positions: filling
    the packed bitmask, and the whole `batch_mask` (fill + unpack to bool, on the CPU)."""
    manager = GrammarManager(backend_name, tokenizer, len(tokenizer.hf))
    compiled = manager.request(GrammarKey("json_schema", json.dumps(MEDIUM_SCHEMA))).result()
    ids = tokenizer.hf.encode(json.dumps(MEDIUM_INSTANCE), add_special_tokens=False)
    matchers = []
    for row in range(batch_size):
        matcher = manager.new_matcher(compiled)
        for token_id in ids[: row * len(ids) // batch_size]:
            assert matcher.accept_token(token_id)
        matchers.append(matcher)
    manager.batch_mask(matchers, device="cpu")  # warm the lazy backends
    fill, full = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        manager.batch_bitmask(matchers)
        fill.append(time.perf_counter() - start)
        start = time.perf_counter()
        manager.batch_mask(matchers, device="cpu")
        full.append(time.perf_counter() - start)
    manager.shutdown()
    return statistics.median(fill) * 1e3, statistics.median(full) * 1e3


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["xgrammar", "llguidance", "outlines"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--outlines-timeout", type=float, default=120.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--result-file", default=None, help="append one JSON line per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from plait.runtime.model_loader import resolve_model

    tokenizer = resolve_model(None).tokenizer
    hf = tokenizer.hf
    vocab_size = len(hf)
    rows: list[Row | tuple[str, str, str]] = []
    batch_ms: dict[str, tuple[float, float]] = {}
    for name in args.backends:
        if name == "outlines":
            for case in cases():
                ids = hf.encode(case.sample, add_special_tokens=False)
                result = measure_outlines(hf, tokenizer.eos_token_ids[0], case, ids, args.outlines_timeout)
                rows.append(result if isinstance(result, Row) else ("outlines-core", case.name, result))
            continue
        start = time.perf_counter()
        backend = backend_class(name)(tokenizer, vocab_size)
        setup_ms = (time.perf_counter() - start) * 1e3
        print(f"{name}: tokenizer setup {setup_ms:.0f} ms", flush=True)
        for case in cases():
            ids = hf.encode(case.sample, add_special_tokens=False)
            rows.append(measure_backend(backend, case, ids, args.repeat))
            print(rows[-1], flush=True)
        batch_ms[name] = measure_batch(tokenizer, name, args.batch_size, args.repeat * 5)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nload average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} CPUs")
    header = (
        "| backend | case | check ms | compile ms | stall ms | first mask us | mask mean us | mask max us | walk ms"
        " | tokens |"
    )
    print()
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if isinstance(row, Row):
            cells = [row.backend, row.case_name] + [_fmt(v) for v in row[2:9]] + [str(row.tokens)]
        else:
            cells = [row[0], row[1], "-", row[2], "-", "-", "-", "-", "-", "-"]
        print("| " + " | ".join(cells) + " |")
    print()
    for name, (fill_ms, full_ms) in batch_ms.items():
        print(
            f"{name}: {args.batch_size} rows of the medium schema: fill {fill_ms:.2f} ms,"
            f" batch_mask (fill + unpack) {full_ms:.2f} ms"
        )
    if args.result_file:
        with open(args.result_file, "a") as f:
            for row in rows:
                record = row._asdict() if isinstance(row, Row) else dict(zip(("backend", "case", "result"), row))
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
