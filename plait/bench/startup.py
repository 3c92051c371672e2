"""First-use benchmark on the CPU: how long `plait generate` takes, how long the server takes to get
ready, and how much memory its processes hold idle, at the peak of one long request (by default a
7,600-token prompt and a 512-token answer: 8,112 tokens of KV, near the default model's 8,192 context)
and after `/flush_cache`. Prints each figure as it is measured, then a table, and writes JSON.

    python -m plait.bench.startup --output-file startup.json            # default model
    python -m plait.bench.startup --runs 3 -- --dtype float32           # flags after -- go to both

RSS is read from /proc (Linux): the scheduler process's `VmRSS` now and `VmHWM` (its peak). Install
time is measured by timing `scripts/install.sh` itself (see the performance docs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

READY_LINE = re.compile(r"The server is ready at (\S+)")
LONG_TEXT = ("The keeper climbed the stairs of the lighthouse every evening, counted the ships that passed, "
             "and wrote down the weather, the wind and the colour of the sea in a book that nobody read. ")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def time_generate(prompt: str, max_new_tokens: int, runs: int, extra: list[str]) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds: user + system) of whole `plait generate` commands, a fresh process each
    (imports, load, answer). CPU time is the steadier figure on a machine shared with other work."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "plait.cli", "generate", prompt, "--max-new-tokens", str(max_new_tokens),
                        *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict[str, Any] | None = None, timeout: float = 3600) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None


def _note(results: dict[str, Any], key: str, value: Any) -> None:
    results[key] = value
    print(f"  {key} = {value:.2f}" if isinstance(value, float) else f"  {key} = {value}", flush=True)


def serve_and_measure(prompt_tokens: int, answer_tokens: int, extra: list[str], result: dict[str, Any]) -> None:
    """Start a server, time it to its ready line, then read RSS idle, over a long answer, and after a flush."""
    port = _free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "plait.launch_server", "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if READY_LINE.search(line):
                _note(result, "ready_s", time.perf_counter() - start)
                break
        else:
            raise RuntimeError(f"the server exited ({proc.wait()}) before it was ready")
        # Keep draining the log so the server never blocks on a full pipe.
        import threading

        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        (scheduler,) = _children(proc.pid)[-1:] or [proc.pid]
        time.sleep(1.0)
        _note(result, "idle_rss_mib", _status_kib(scheduler, "VmRSS") / 1024)
        _note(result, "http_idle_rss_mib", _status_kib(proc.pid, "VmRSS") / 1024)
        # A long prompt as token ids (a text's ids repeated), then an answer that ignores EOS.
        ids = json.loads(_post(f"{url}/tokenize", {"prompt": LONG_TEXT}))["tokens"]
        prompt = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
        body = {"input_ids": prompt,
                "sampling_params": {"max_new_tokens": answer_tokens, "ignore_eos": True, "temperature": 0.8}}
        t = time.perf_counter()
        out = json.loads(_post(f"{url}/generate", body))
        _note(result, "prompt_tokens", out["meta_info"]["prompt_tokens"])
        _note(result, "answer_tokens", out["meta_info"]["completion_tokens"])
        _note(result, "long_request_s", time.perf_counter() - t)
        _note(result, "peak_rss_mib", _status_kib(scheduler, "VmHWM") / 1024)
        _note(result, "after_answer_rss_mib", _status_kib(scheduler, "VmRSS") / 1024)
        _post(f"{url}/flush_cache", {})
        time.sleep(1.0)
        _note(result, "after_flush_rss_mib", _status_kib(scheduler, "VmRSS") / 1024)
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="plait generate runs (the first also fills caches)")
    parser.add_argument("--prompt", default="Tell me about Paris in two sentences.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="of each plait generate")
    parser.add_argument("--prompt-tokens", type=int, default=7600, help="length of the long request's prompt")
    parser.add_argument("--answer-tokens", type=int, default=512,
                        help="length of its answer (ignore_eos); prompt + answer must fit the context")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--output-file", default=None, help="write the results as JSON here")
    parser.add_argument("extra", nargs="*", help="flags for both plait generate and the server, after --")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0], "flags": args.extra,
    }
    gen, gen_cpu = time_generate(args.prompt, args.max_new_tokens, args.runs, args.extra)
    _note(results, "generate_s", [round(g, 2) for g in gen])
    _note(results, "generate_cpu_s", [round(g, 2) for g in gen_cpu])
    _note(results, "generate_warm_median_s", statistics.median(gen[1:] or gen))
    _note(results, "generate_warm_median_cpu_s", statistics.median(gen_cpu[1:] or gen_cpu))
    if not args.skip_server:
        serve_and_measure(args.prompt_tokens, args.answer_tokens, args.extra, results)
    results["load_avg_at_end"] = os.getloadavg()[0]

    rows = [("plait generate, first run (s)", gen[0]),
            ("plait generate, warm median (s)", results["generate_warm_median_s"]),
            ("plait generate, warm median CPU time (s)", results["generate_warm_median_cpu_s"])]
    for key, label in (("ready_s", "server: time to ready (s)"), ("idle_rss_mib", "scheduler RSS idle (MiB)"),
                       ("http_idle_rss_mib", "HTTP process RSS idle (MiB)"),
                       ("peak_rss_mib", f"scheduler peak RSS, {args.prompt_tokens} + {args.answer_tokens} tokens (MiB)"),
                       ("after_answer_rss_mib", "scheduler RSS after that request (MiB)"),
                       ("after_flush_rss_mib", "scheduler RSS after /flush_cache (MiB)"),
                       ("long_request_s", "the long request took (s)")):
        if key in results:
            rows.append((label, results[key]))
    print(f"{results['cpu']}, {results['cores']} cores, load {results['load_avg_at_start']:.2f} -> "
          f"{results['load_avg_at_end']:.2f}, {results['date']}")
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value:10.2f}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
