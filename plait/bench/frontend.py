"""Frontend benchmark: batches of few-shot and tree-of-thought programs against a server, with the
frontend's parallelism and cache hints on (Plait's defaults) vs off (one program at a time, no
fork/prefix hints). Both use the same server and its radix cache; the cache is flushed before each run.

    python -m plait.bench.frontend --url http://127.0.0.1:30000 --num-programs 16
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request

import plait as sgl
from plait.lang.global_config import global_config

EXAMPLES = "".join(
    f"Q: {q}\nA: {a}\n\n"
    for q, a in [
        ("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
        ("Which planet is known as the Red Planet?", "Mars"), ("What is the boiling point of water in Celsius?", "100"),
        ("Who painted the Mona Lisa?", "Leonardo da Vinci"), ("What is the largest mammal?", "The blue whale"),
        ("How many continents are there?", "Seven"), ("What language is spoken in Brazil?", "Portuguese"),
        ("What is the chemical symbol for gold?", "Au"), ("Which ocean is the largest?", "The Pacific"),
        ("What is the square root of 81?", "Nine"), ("Who wrote Hamlet?", "William Shakespeare"),
    ]
)
QUESTIONS = [f"What is {a} plus {b}?" for a in range(2, 12) for b in range(3, 9)]


@sgl.function
def few_shot(s, question):
    s += "Answer the questions briefly.\n\n" + EXAMPLES
    s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=12, stop="\n", temperature=0)


@sgl.function
def tree_of_thought(s, question):
    s += "You solve problems step by step.\n\nQuestion: " + question + "\n"
    plans = s.fork(2)
    plans += lambda i: f"Approach {i + 1}:" + sgl.gen("plan", max_tokens=24, stop="\n", temperature=0)
    leaves = []
    for plan in plans:
        steps = plan.fork(2)
        steps += lambda i: f"\nStep {i + 1}:" + sgl.gen("step", max_tokens=24, stop="\n", temperature=0)
        steps += "\nIs this correct?" + sgl.select("verdict", choices=[" yes", " no"])
        leaves += list(steps)
    best = max(leaves, key=lambda leaf: leaf.get_meta_info("verdict")["normalized_prompt_logprobs"][0])
    s += "Best step:" + best["step"] + "\nAnswer:" + sgl.gen("answer", max_tokens=8, stop="\n", temperature=0)


def _flush(url: str) -> None:
    """Empty the server's prefix cache (it refuses while requests still run: retry for a while)."""
    for _ in range(300):
        try:
            urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", method="POST"), timeout=60).read()
            return
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise
            time.sleep(0.1)
    raise RuntimeError("the server did not become idle to flush its cache")


def _cache_counters(url: str) -> tuple[int, int]:
    info = json.loads(urllib.request.urlopen(url + "/get_server_info", timeout=60).read())
    cache = info["internal_states"][0]["cache"]
    return cache["cached_tokens_total"], cache["prompt_tokens_total"]


def run(program, args_list: list[dict], *, url: str, optimized: bool) -> dict:
    global_config.enable_fork_hint = optimized
    global_config.enable_precache_with_tracing = optimized
    _flush(url)
    cached0, prompt0 = _cache_counters(url)
    start = time.perf_counter()
    states = program.run_batch(args_list, num_threads=len(args_list) if optimized else 1)
    elapsed = time.perf_counter() - start
    for state in states:
        state.sync()
        if state.error():
            raise RuntimeError(state.error())
    cached1, prompt1 = _cache_counters(url)
    hit_rate = (cached1 - cached0) / max(prompt1 - prompt0, 1)
    return {"programs": len(args_list), "elapsed_s": elapsed, "programs_per_s": len(args_list) / elapsed,
            "cache_hit_rate": round(hit_rate, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--num-programs", type=int, default=16, help="few-shot programs (tree-of-thought: a quarter)")
    ap.add_argument("--result-file", default=None)
    args = ap.parse_args(argv)
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    workloads = {
        "few-shot": (few_shot, [{"question": q} for q in QUESTIONS[: args.num_programs]]),
        "tree-of-thought": (tree_of_thought, [{"question": q} for q in QUESTIONS[: max(1, args.num_programs // 4)]]),
    }
    run(few_shot, workloads["few-shot"][1][:2], url=args.url, optimized=True)  # warm up
    rows = []
    for name, (program, arg_list) in workloads.items():
        for optimized in (False, True):
            row = {"workload": name, "frontend_parallel_and_hints": optimized,
                   **run(program, arg_list, url=args.url, optimized=optimized)}
            rows.append(row)
            print(f"{name:>16} {'on ' if optimized else 'off'} {row['programs']:4d} programs "
                  f"{row['elapsed_s']:7.2f} s {row['programs_per_s']:6.2f} prog/s hit rate {row['cache_hit_rate']}")
    if args.result_file:
        with open(args.result_file, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
