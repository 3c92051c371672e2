"""Single requests alternated between servers that run at the same time, for machines whose speed drifts.

    python -m plait.bench.alternate --server plait=http://127.0.0.1:30000 --server vllm=http://127.0.0.1:8000 \\
        --model smollm2 --prompt-len 512 --new-tokens 2 --rounds 20

On a shared machine (other tenants, cores that are hyperthreads of someone else's) the same request
can take 30% longer from one minute to the next, so engines measured one after the other differ by
the minute they ran in as much as by their speed. Here every server is started first and stays up,
idle but for the request being timed: each round sends one streamed `/v1/completions` request to each
server in turn (the order reversed every other round), each a new random prompt of exactly
`--prompt-len` token ids (no prefix cache helps) and `--new-tokens` greedy tokens with `ignore_eos`.
Per server: the median and range of the prefill rate from the time to first token (prompt tokens /
TTFT) and of the decode rate ((tokens - 1) / time from the first token to the last, with 3 or more new
tokens); per server against the first, the median and range of the rounds' ratios of those rates,
which compare requests timed seconds apart. Prints a table and appends one JSON line to --output-file.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics

from plait.bench.decode_context import one_request
from plait.bench.one_batch import environment, write_result


def parse_server(spec: str) -> tuple[str, str]:
    name, sep, url = spec.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=URL, got {spec!r}")
    return name, url.rstrip("/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", type=parse_server, action="append", required=True,
                        help="NAME=URL of a running OpenAI-compatible server (two or more; the first is the reference)")
    parser.add_argument("--model", default=None, help="the servers' model name, if they want one")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--vocab-low", type=int, default=1000, help="prompt token ids are drawn from [low, high)")
    parser.add_argument("--vocab-high", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=None, help="prompt seed (default: a fresh one each run, so "
                                                               "that a second run finds nothing in the caches)")
    parser.add_argument("--run-name", default="")
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    servers = dict(args.server)
    if len(servers) < 2:
        parser.error("give at least two --server NAME=URL (distinct names)")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be 2 or more (the first token's time is the prefill's)")
    rng = random.Random(args.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(args.vocab_low, args.vocab_high) for _ in range(n)]

    for url in servers.values():  # warm-up
        asyncio.run(one_request(url, args.model, prompt(16), 4))
    names = list(servers)
    timed: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            ttft, decode, _ = asyncio.run(one_request(servers[name], args.model, prompt(args.prompt_len),
                                                      args.new_tokens))
            timed[name].append((args.prompt_len / ttft, decode))

    reference = names[0]
    rows = []
    for name in names:
        prefill = [p for p, _ in timed[name]]
        decode = [d for _, d in timed[name] if d is not None]
        row = {"server": name, "url": servers[name], "prefill_tok_s": statistics.median(prefill),
               "prefill_tok_s_range": [min(prefill), max(prefill)]}
        if decode:
            row["decode_tok_s"] = statistics.median(decode)
            row["decode_tok_s_range"] = [min(decode), max(decode)]
        if name != reference:
            ratios = [a[0] / b[0] for a, b in zip(timed[reference], timed[name])]
            row[f"{reference}_prefill_ratio"] = statistics.median(ratios)
            row[f"{reference}_prefill_ratio_range"] = [min(ratios), max(ratios)]
            ratios = [a[1] / b[1] for a, b in zip(timed[reference], timed[name]) if a[1] and b[1]]
            if ratios:
                row[f"{reference}_decode_ratio"] = statistics.median(ratios)
                row[f"{reference}_decode_ratio_range"] = [min(ratios), max(ratios)]
        rows.append(row)

    print(f"{args.rounds} rounds, prompt {args.prompt_len} tokens, {args.new_tokens} new")
    print(f"{'server':>14} {'prefill tok/s':>14} {'decode tok/s':>13} {reference + ' / it, prefill':>24}"
          f" {reference + ' / it, decode':>24}")
    for row in rows:
        decode = f"{row['decode_tok_s']:>13.1f}" if "decode_tok_s" in row else f"{'-':>13}"
        ratio = (f"{row[reference + '_prefill_ratio']:.3f} ({row[reference + '_prefill_ratio_range'][0]:.2f}-"
                 f"{row[reference + '_prefill_ratio_range'][1]:.2f})") if row["server"] != reference else "-"
        decode_ratio = (f"{row[reference + '_decode_ratio']:.3f} ({row[reference + '_decode_ratio_range'][0]:.2f}-"
                        f"{row[reference + '_decode_ratio_range'][1]:.2f})") if reference + "_decode_ratio" in row else "-"
        print(f"{row['server']:>14} {row['prefill_tok_s']:>14.1f} {decode} {ratio:>24} {decode_ratio:>24}")
    write_result(args.output_file, {"bench": "alternate", "run_name": args.run_name, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows, "env": environment()})


if __name__ == "__main__":
    main()
