"""Single-stream decode speed as the context grows, against any OpenAI-compatible server.

    python -m plait.bench.decode_context --base-url http://127.0.0.1:30000 --contexts 128 1024 4096 8192

For each context length, one streamed `/v1/completions` request at a time: a prompt of exactly that
many token ids (random, seeded; each repetition a different prompt, so no prefix cache helps), then
`--new-tokens` greedy tokens with `ignore_eos`. Decode speed is (tokens - 1) / (time of the last
token - time of the first), so it leaves the prompt's prefill out; the median over `--reps` is
reported, with the time to first token. Prints a table, including each length's speed as a
fraction of the shortest's, and appends one JSON line to --output-file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from plait.bench.one_batch import environment, write_result
from plait.bench.serving import http_request


async def one_request(base_url: str, model: str | None, prompt: list[int],
                      new_tokens: int) -> tuple[float, float | None, int]:
    """(time to first token, decode tokens per second or None under 3 tokens, tokens received) of one
    streamed request. Every streamed choice counts as a token, an empty text too (a token that ends
    inside a character: its bytes come with the next), so the first token's time is the prefill's."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True,
            "min_tokens": new_tokens, "stream": True}
    if model:
        body["model"] = model
    start = time.perf_counter()
    first = last = None
    count = 0
    buffer = b""
    async for chunk in http_request(base_url.rstrip("/") + "/v1/completions", body, timeout=3600):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                now = time.perf_counter()
                first = first or now
                last = now
                count += 1
    if first is None:
        raise RuntimeError(f"{base_url} streamed no token")
    return first - start, ((count - 1) / (last - first) if count >= 3 and last > first else None), count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default=None, help="the server's model name, if it wants one")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 8192])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--vocab-low", type=int, default=1000, help="prompt token ids are drawn from [low, high)")
    parser.add_argument("--vocab-high", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-name", default="")
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    asyncio.run(one_request(args.base_url, args.model, [rng.randrange(args.vocab_low, args.vocab_high)
                                                        for _ in range(16)], 4))  # warm-up
    for context in args.contexts:
        runs = []
        for _ in range(args.reps):
            prompt = [rng.randrange(args.vocab_low, args.vocab_high) for _ in range(context)]
            run = asyncio.run(one_request(args.base_url, args.model, prompt, args.new_tokens))
            if run[1] is None:
                raise RuntimeError(f"the server streamed {run[2]} tokens; cannot time decoding")
            runs.append(run)
        rows.append({"context": context, "ttft_s": statistics.median(r[0] for r in runs),
                     "decode_tok_s": statistics.median(r[1] for r in runs), "tokens": runs[0][2]})
    base = rows[0]["decode_tok_s"]
    print(f"{'context':>8} {'TTFT s':>8} {'decode tok/s':>13} {'vs shortest':>12}")
    for row in rows:
        row["vs_shortest"] = row["decode_tok_s"] / base
        print(f"{row['context']:>8} {row['ttft_s']:>8.2f} {row['decode_tok_s']:>13.1f} {row['vs_shortest']:>11.0%}")
    write_result(args.output_file, {"bench": "decode_context", "run_name": args.run_name, "base_url": args.base_url,
                 "new_tokens": args.new_tokens, "reps": args.reps, "rows": rows, "env": environment()})


if __name__ == "__main__":
    main()
