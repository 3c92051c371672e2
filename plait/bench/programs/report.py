"""Tables and plots from the suite's JSON lines: throughput per workload normalised to the best
system (the paper's Fig. 5/6), latency the same way, and the ablations against the full system
(Fig. 8c). matplotlib is imported only to plot (`pip install plait[bench]`)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Iterable

COLUMNS = ("workload", "mode", "label", "ablation", "programs", "duration_s", "programs_per_s", "latency_s_mean",
           "hit_rate", "computed_prompt_tokens", "output_tokens", "calls")


def read_records(paths: Iterable[str]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("bench") == "programs"]


def format_record(r: dict[str, Any]) -> str:
    """One line per run, as the suite prints it."""
    if r.get("error"):
        return f"{r['workload']:<20} {r['mode']:<7} {r['label']:<14} {r['ablation']:<15} FAILED: {r['error']}"
    lat = f"{r['latency_s_mean']:8.2f} s" if r.get("latency_s_mean") is not None else " " * 10
    hit = f"{r['hit_rate']:.3f}" if r.get("hit_rate") is not None else "  n/a"
    calls = r["calls"]
    shape = f"{calls.get('gens', 0)}g {calls.get('selects', 0)}s {calls.get('forks', 0)}f {calls.get('hints', 0)}h"
    valid = f" valid {r['valid']:.0%}" if r.get("valid") is not None else ""
    warn = "" if r.get("structure_ok") else " (calls differ from the program's claim)"
    return (f"{r['workload']:<20} {r['mode']:<7} {r['label']:<14} {r['ablation']:<15} {r['programs']:4d} prog "
            f"{r['duration_s']:7.2f} s {r['programs_per_s']:7.2f} prog/s {lat} hit {hit} "
            f"computed {_num(r.get('computed_prompt_tokens')):>7} out {_num(r.get('output_tokens')):>6}  "
            f"{shape}{valid}{warn}")


def _num(value: Any) -> str:
    return "n/a" if value is None else str(value)


def latest(records: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """The last record of each (workload, mode, label, ablation): a rerun replaces a run."""
    out = {}
    for r in records:
        out[(r["workload"], r["mode"], r["label"], r.get("ablation", "full"))] = r
    return out


def comparison_table(records: list[dict[str, Any]]) -> str:
    """Workloads down, systems across: batch programs/s, latency and hit rate (full systems only)."""
    runs = {k: r for k, r in latest(records).items() if k[3] == "full" and not r.get("error")}
    if not runs:
        return ""
    labels = _ordered(k[2] for k in runs)
    workloads = _ordered(k[0] for k in runs)
    head = "| workload | " + " | ".join(f"{lab} prog/s | {lab} latency s | {lab} hit" for lab in labels) + " |"
    lines = [head, "|---" * (1 + 3 * len(labels)) + "|"]
    for w in workloads:
        cells = []
        for lab in labels:
            b, lat = runs.get((w, "batch", lab, "full")), runs.get((w, "latency", lab, "full"))
            cells += [f"{b['programs_per_s']:.2f}" if b else "-",
                      f"{lat['latency_s_mean']:.2f}" if lat else "-",
                      f"{b['hit_rate']:.3f}" if b and b.get("hit_rate") is not None else "-"]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(records: list[dict[str, Any]]) -> str:
    """Batch throughput of each ablation as a share of the full system's (same label)."""
    runs = {k: r for k, r in latest(records).items() if k[1] == "batch" and not r.get("error")}
    rows = []
    for (w, _, lab, abl), r in runs.items():
        full = runs.get((w, "batch", lab, "full"))
        if abl != "full" and full:
            rows.append((w, lab, abl, r["programs_per_s"] / full["programs_per_s"], r.get("hit_rate")))
    if not rows:
        return ""
    lines = ["| workload | system | ablation | throughput vs full | hit rate |", "|---|---|---|---:|---:|"]
    for w, lab, abl, ratio, hit in rows:
        lines.append(f"| {w} | {lab} | {abl} | {ratio:.2f} | {'-' if hit is None else f'{hit:.3f}'} |")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], out_dir: str) -> list[str]:
    """Write the figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = {k: r for k, r in latest(records).items() if not r.get("error")}
    written = []

    def bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
        width = 0.8 / max(len(series), 1)
        for i, (name, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                   width, label=name)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.legend(fontsize="small")

    for mode, metric, better, fname in (("batch", "programs_per_s", max, "programs_throughput.png"),
                                        ("latency", "latency_s_mean", min, "programs_latency.png")):
        full = {k: r for k, r in runs.items() if k[1] == mode and k[3] == "full"}
        labels, workloads = _ordered(k[2] for k in full), _ordered(k[0] for k in full)
        if not full:
            continue
        series: dict[str, list[float | None]] = defaultdict(list)
        for w in workloads:
            values = {lab: full[(w, mode, lab, "full")][metric] for lab in labels if (w, mode, lab, "full") in full}
            best = better(values.values())
            for lab in labels:
                v = values.get(lab)
                series[lab].append(None if v is None else (v / best if mode == "batch" else best / v))
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(workloads)), 3.6))
        title = "throughput" if mode == "batch" else "speed of one program (best latency / latency)"
        bars(ax, [full[next(k for k in full if k[0] == w)]["title"] for w in workloads], series,
             f"{title}\nnormalised to the best system")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    ablated = {k: r for k, r in runs.items() if k[1] == "batch" and k[3] != "full"
               and (k[0], "batch", k[2], "full") in runs}
    if ablated:
        label = _ordered(k[2] for k in ablated)[0]
        workloads = _ordered(k[0] for k in ablated if k[2] == label)
        names = _ordered(k[3] for k in ablated if k[2] == label)
        series = {abl: [(runs[(w, "batch", label, abl)]["programs_per_s"] / runs[(w, "batch", label, "full")]
                         ["programs_per_s"]) if (w, "batch", label, abl) in runs else None for w in workloads]
                  for abl in names}
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(workloads)), 3.6))
        bars(ax, [runs[(w, "batch", label, "full")]["title"] for w in workloads], series,
             f"{label}: throughput\nrelative to the full system")
        fig.tight_layout()
        path = os.path.join(out_dir, "programs_ablations.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _ordered(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
