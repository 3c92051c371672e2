"""JSON decoding benchmark shaped like the paper's: a long document, then a JSON object extracted
from it under a schema. Runs the same batch with jump-forward (the compressed FSM) on and off and
reports throughput, tokens forced vs decoded, and the grammar mask's cost per constrained token.

    python -m plait.bench.json_decode --num-requests 16 --doc-len 512
"""

from __future__ import annotations

import argparse
import json
import random
import time

from plait.runtime.engine import Engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "founded": {"type": "integer"},
        "population_millions": {"type": "number"},
        "is_capital": {"type": "boolean"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["name", "country", "founded", "population_millions", "is_capital", "landmarks"],
}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Perth", "Dakar", "Turin"]
WORDS = ("the city river old market bridge museum north trade port festival square history winter "
         "summer tower people language music food street park").split()


def document(rng: random.Random, city: str, approx_words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(approx_words))
    return f"{city} is a city. {body}. {city} was founded long ago and is known for its {rng.choice(WORDS)}."


def run(engine: Engine, prompts: list[str], *, max_new_tokens: int, jump: bool) -> dict:
    engine.scheduler.constraints.jump_forward = jump
    before = dict(engine.scheduler.stats)
    cstats = dict(engine.scheduler.constraints.stats)
    params = {"max_new_tokens": max_new_tokens, "temperature": 0, "json_schema": json.dumps(SCHEMA)}
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    after, cafter = engine.scheduler.stats, engine.scheduler.constraints.stats
    valid = 0
    for r in results:
        try:
            json.loads(r["text"])
            valid += 1
        except ValueError:
            pass
    out_tokens = sum(r["meta_info"]["completion_tokens"] for r in results)
    forced = cafter["jump_forced_tokens"] - cstats["jump_forced_tokens"]
    mask_rows = cafter["mask_rows"] - cstats["mask_rows"]
    return {
        "jump_forward": jump,
        "requests": len(prompts),
        "elapsed_s": elapsed,
        "request_throughput": len(prompts) / elapsed,
        "output_tokens": out_tokens,
        "output_throughput": out_tokens / elapsed,
        "decode_steps": after["decode_steps"] - before["decode_steps"],
        "extend_steps": after["extend_steps"] - before["extend_steps"],
        "tokens_forced": forced,
        "tokens_sampled": mask_rows,
        "jumps": cafter["jumps"] - cstats["jumps"],
        "mask_us_per_token": 1e6 * (cafter["mask_seconds"] - cstats["mask_seconds"]) / max(mask_rows, 1),
        "valid_json": valid,
        "texts": [r["text"] for r in results[:2]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--doc-len", type=int, default=400, help="words in each document")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--grammar-backend", default="llguidance")
    ap.add_argument("--result-file", default=None)
    args = ap.parse_args(argv)
    rng = random.Random(0)
    with Engine(args.model_path, dtype=args.dtype, grammar_backend=args.grammar_backend) as engine:
        prompts = []
        for i in range(args.num_requests):
            doc = document(rng, CITIES[i % len(CITIES)], args.doc_len)
            messages = [{"role": "user", "content": f"{doc}\n\nExtract the city's facts as JSON."}]
            prompts.append(engine.tokenizer.apply_chat_template(messages))
        run(engine, prompts[:2], max_new_tokens=args.max_new_tokens, jump=True)  # warm up, compile the schema
        rows = []
        for jump in (False, True, False, True):
            engine.flush_cache()
            time.sleep(0.1)
            rows.append(run(engine, prompts, max_new_tokens=args.max_new_tokens, jump=jump))
    rows = rows[2:]  # the second pair: both measured warm
    print(f"{'jump-forward':>12} {'req/s':>7} {'out tok/s':>9} {'decode steps':>12} {'forced':>7} {'sampled':>8} {'mask us/tok':>11} {'valid':>6}")
    for r in rows:
        print(f"{str(r['jump_forward']):>12} {r['request_throughput']:7.2f} {r['output_throughput']:9.1f} "
              f"{r['decode_steps']:12d} {r['tokens_forced']:7d} {r['tokens_sampled']:8d} {r['mask_us_per_token']:11.1f} "
              f"{r['valid_json']:>3}/{r['requests']}")
    print("sample:", rows[-1]["texts"][0])
    if args.result_file:
        with open(args.result_file, "a") as f:
            for r in rows:
                f.write(json.dumps({**vars(args), **r}) + "\n")


if __name__ == "__main__":
    main()
