"""Run the paper's workloads as Plait programs and report throughput, latency, cache hit rates.

    python -m plait.bench.programs                                  # every workload, in-process engine
    python -m plait.bench.programs --quick                          # every workload at a small size
    python -m plait.bench.programs --backend endpoint --base-url http://127.0.0.1:30000   # plait serve
    python -m plait.bench.programs --backend openai --base-url http://127.0.0.1:8000      # vLLM, llama-server
    python -m plait.bench.programs --ablations all                  # the paper's Fig. 8c on the engine
    python -m plait.bench.programs --backend endpoint --server-ablation no-cache  # plait serve --disable-radix-cache
    python -m plait.bench.programs --plot results.jsonl             # tables and figures from results

Each workload runs as a batch (`run_batch`, programs/s) and one program at a time (latency). Every
unconstrained `gen` produces exactly its `max_tokens` (stop strings dropped, EOS ignored) and
decoding is greedy, so every engine does the same work; `--natural-lengths` keeps stops and EOS.
Results go to stdout and, one JSON line per run, to `--result-file`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import plait as sgl
from plait.bench.one_batch import add_config_args, config_options
from plait.bench.offline_throughput import engine_choices
from plait.bench.programs import SIZES, WORKLOADS
from plait.bench.programs.ablations import ABLATIONS, Ablation, frontend_settings, parse_ablations
from plait.bench.programs.measure import MeasuredBackend
from plait.bench.programs.report import ablation_table, comparison_table, format_record, plot, read_records
from plait.bench.programs.runner import MODES, environment, run_workload, warm_up
from plait.bench.programs.targets import SERVERS, Target, endpoint_target, engine_target, openai_target
from plait.bench.programs.text import VOCABULARIES, use_vocabulary
from plait.runtime.config import RuntimeConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m plait.bench.programs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="all", help=f"comma-separated, or all: {', '.join(WORKLOADS)}")
    p.add_argument("--exclude", default="", help="comma-separated workloads to leave out")
    p.add_argument("--size", choices=SIZES, default="cpu",
                   help="shapes: paper (the paper's lengths, for a GPU), cpu (scaled for a few cores), quick")
    p.add_argument("--quick", action="store_true", help="--size quick: every workload in a few programs (a smoke test)")
    p.add_argument("--modes", default="batch,latency", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--backend", choices=("engine", "endpoint", "openai"), default="engine",
                   help="engine: Plait in this process; endpoint: a Plait or SGLang server's /generate; "
                        "openai: any OpenAI-compatible server's /v1/completions")
    p.add_argument("--base-url", default="http://127.0.0.1:30000", help="endpoint, openai: the server")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="openai: the served model name (default: the first listed)")
    p.add_argument("--server", choices=("auto", *SERVERS), default="auto",
                   help="openai: which server it is (how it takes regexes, where its cache counters are); "
                        "auto: from /v1/models")
    p.add_argument("--role-template", default="chatml",
                   help="the template that renders roles, the same for every backend; auto: each backend's own")
    p.add_argument("--ablations", default="none",
                   help=f"none, all, or comma-separated ({', '.join(a for a in ABLATIONS if a != 'full')}); "
                        "ablations other than full run in batch mode only")
    p.add_argument("--server-ablation", default=None, choices=[a.name for a in ABLATIONS.values() if a.engine],
                   help="endpoint, openai: the server was started with this ablation's setting (e.g. no-cache: "
                        "--disable-radix-cache); its runs are recorded as that ablation of --label, in batch mode")
    p.add_argument("--num-threads", type=int, default=64, help="run_batch threads (programs in flight)")
    p.add_argument("--natural-lengths", action="store_true", help="keep stop strings and EOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocabulary", choices=tuple(VOCABULARIES), default="english",
                   help="words of the synthetic text; synthetic: w10 ... w2009, for the word-level tokenizer of "
                        "dummy-weight runs (scripts/gpu/make_tokenizer.py), which knows no English")
    p.add_argument("--label", default=None, help="the system's name in tables and plots")
    p.add_argument("--no-warmup", action="store_true", help="skip the two unmeasured programs before each workload")
    p.add_argument("--result-file", default=None, help="append one JSON line per run")
    p.add_argument("--skip-done", action="store_true",
                   help="skip runs --result-file already holds (same label, size, workload, mode, ablation), "
                        "to finish an interrupted sitting")
    p.add_argument("--plot", nargs="+", default=None, metavar="RESULTS",
                   help="run nothing: print the tables and write the figures from these JSON-lines files")
    p.add_argument("--plot-dir", default="docs/figures", help="where --plot writes its PNG files")
    # --backend engine: the runtime's own flags (--model-path, --dtype, --load-format, --max-total-tokens, ...).
    add_config_args(p, *RuntimeConfig.sections().values(), choices=engine_choices())
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot:
        return report(read_records(args.plot), plot_dir=args.plot_dir)
    if args.num_threads < 1:
        parser.error("--num-threads must be at least 1")
    names = list(WORKLOADS) if args.workloads == "all" else [n.strip() for n in args.workloads.split(",") if n.strip()]
    excluded = [n.strip() for n in args.exclude.split(",") if n.strip()]
    unknown = [n for n in names + excluded if n not in WORKLOADS]
    names = [n for n in names if n not in excluded]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown or not names:
        parser.error(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(WORKLOADS)}")
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes {', '.join(MODES)}")
    try:
        ablations = parse_ablations(args.ablations)
    except ValueError as e:
        parser.error(str(e))
    options = config_options(args, *RuntimeConfig.sections().values())
    if args.backend != "engine":
        if options:
            parser.error(f"runtime flags ({', '.join(options)}) apply to --backend engine; start the server with them")
        runtime_side = [a for a in ablations if a.engine]
        if runtime_side:
            parser.error("; ".join(f"{a.name} changes the runtime: use --backend engine, or start the server with "
                                   f"{a.launch_flags} and pass --server-ablation {a.name}" for a in runtime_side))
    if args.server_ablation and (args.backend == "engine" or len(ablations) > 1):
        parser.error("--server-ablation names the setting of a server (--backend endpoint or openai), alone")
    use_vocabulary(args.vocabulary)
    size = "quick" if args.quick else args.size
    template = None if args.role_template == "auto" else args.role_template
    env = environment()
    records: list[dict[str, Any]] = []

    def build(ablation: Ablation) -> Target:
        if args.backend == "engine":
            return engine_target({**options, **ablation.engine}, chat_template=template, label=args.label)
        if args.backend == "endpoint":
            return endpoint_target(args.base_url, api_key=args.api_key, chat_template=template, label=args.label)
        return openai_target(args.base_url, model=args.model, api_key=args.api_key, server=args.server,
                             chat_template=template, label=args.label)

    # Frontend ablations share the full system's target; a runtime ablation gets a fresh engine.
    shared = [a for a in ablations if not a.engine]
    runs = [(shared, build(shared[0]))] + [([a], None) for a in ablations if a.engine]
    if args.server_ablation:
        runs = [([ABLATIONS[args.server_ablation]], build(ABLATIONS["full"]))]
    for group, target in runs:
        target = target or build(group[0])
        try:
            for ablation in group:
                records += run_ablation(target, ablation, names, size, modes if ablation.name == "full" else ["batch"],
                                        args, env)
        finally:
            target.close()
    table = comparison_table(records)
    if table:
        print()
        print(table)
    if len(ablations) > 1:
        print()
        print(ablation_table(records))
    return records


def run_ablation(target: Target, ablation: Ablation, names: list[str], size: str, modes: list[str],
                 args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    measured = MeasuredBackend(target.backend, exact_lengths=not args.natural_lengths)
    sgl.set_default_backend(measured)  # sub-programs (skeleton of thought) run on the default backend
    done = set()
    if args.skip_done and args.result_file and os.path.exists(args.result_file):
        done = {(r["workload"], r["mode"]) for r in read_records([args.result_file])
                if (r["label"], r["size"], r.get("ablation")) == (target.label, size, ablation.name) and not r["error"]}
    records = []
    with frontend_settings(ablation):
        for name in names:
            workload = WORKLOADS[name]
            todo = [m for m in modes if (name, m) not in done]
            if not todo or ablation.workloads is not None and name not in ablation.workloads:
                continue
            if not args.no_warmup:
                warm_up(workload, size, measured, seed=args.seed)
            for mode in todo:
                started = time.time()
                record = run_workload(workload, size, target, measured, mode, seed=args.seed,
                                      num_threads=args.num_threads)
                record.update(ablation=ablation.name, started=started, env=env)
                print(format_record(record), flush=True)
                if args.result_file:
                    with open(args.result_file, "a") as f:
                        f.write(json.dumps(record, default=str) + "\n")
                records.append(record)
    return records


def report(records: list[dict[str, Any]], *, plot_dir: str) -> list[dict[str, Any]]:
    for r in records:
        print(format_record(r))
    print()
    print(comparison_table(records))
    table = ablation_table(records)
    if table:
        print()
        print(table)
    for path in plot(records, plot_dir):
        print("wrote", path)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
