"""Check the performance targets against the latest results files; print PASS / MISS per target.

Targets (CPU, one run each):
  1. lora, vera, adalora: our adapter overhead over the frozen-base floor <= 1/2 of PEFT's
  2. our peak memory <= PEFT's (lora, vera, adalora)
  3. pg_pos (A_H B_L) costs <= 1.03x our lora per step (LEFT measured 1.21x)
  4. hyper_adalora latency per step <= adalora's (HyperAdaLoRA measured ~0.96x)
  5. hyper_adalora peak memory within 1% of adalora's

Sources (benchmarks/results/): the step suite's pytest-benchmark JSON
``bench_suite_<model>.json`` (timing targets 1, 3, 4; overheads against the floor steps run
alongside each provider when recorded), ``bench_cpu_step[_cpuclock].csv`` (1, interleaved), ``memory_profile_peft.csv`` (2),
``memory_profile_left.csv`` (3), ``memory_profile_hyper.csv`` (4, 5). A missing file is
reported as NO DATA. A check, never a test: the numbers are only as good as the machine was
quiet.

    python benchmarks/targets.py [--model smollm2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, read_csv  # noqa: E402

Check = Tuple[str, str, str, Optional[bool]]  # target, source, measured, passed (None: no data)


def suite_medians(path: str) -> Dict[str, Dict[str, Tuple[float, Optional[float]]]]:
    """group -> provider -> (median seconds, median of the floor steps run alongside it or None),
    from a pytest-benchmark JSON file of test_bench_step.py."""
    with open(path) as f:
        data = json.load(f)
    out: Dict[str, Dict[str, Tuple[float, Optional[float]]]] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "group" in info:  # step benchmarks carry their comparison group
            out.setdefault(info["group"], {})[info["provider"]] = (b["stats"]["median"],
                                                                   info.get("floor_interleaved_s"))
    return out


def overhead(row: Dict[str, Tuple[float, Optional[float]]], provider: str) -> float:
    """Seconds over the floor: against the floor run alongside it when recorded, else against
    the group's floor test (which ran at another time: drift-prone on a shared machine)."""
    median, floor = row[provider]
    return median - (floor if floor is not None else row["floor"][0])


def relative(row: Dict[str, Tuple[float, Optional[float]]], provider: str, reference: str) -> float:
    """provider's step / reference's step, each first divided by its own interleaved floor."""
    def norm(name):
        median, floor = row[name]
        return median / floor if floor else median
    return norm(provider) / norm(reference)


def step_checks(path: str) -> List[Check]:
    src = os.path.basename(path)
    if not os.path.exists(path):
        return [("step targets (1, 3, 4)", src, "file missing", None)]
    med = suite_medians(path)
    checks: List[Check] = []
    for method in ("lora", "vera", "adalora"):
        g = med.get(method, {})
        if not {"floor", method, f"peft_{method}"} <= set(g):
            checks.append((f"{method}: overhead <= 0.5x PEFT's", src, "providers missing", None))
            continue
        ours, theirs = overhead(g, method), overhead(g, f"peft_{method}")
        ratio = ours / theirs if theirs > 0 else float("inf")
        checks.append((f"{method}: overhead <= 0.5x PEFT's", src,
                       f"{ratio:.3f} (ours {1e3 * ours:.1f} ms, PEFT {1e3 * theirs:.1f} ms over the floor)",
                       ratio <= 0.5))
    g = med.get("pg_vs_lora", {})
    if {"lora", "pg_pos"} <= set(g):
        r = relative(g, "pg_pos", "lora")
        checks.append(("pg_pos A_H B_L <= 1.03x lora per step", src, f"{r:.4f}", r <= 1.03))
    g = med.get("hyper_adalora", {})
    if {"adalora", "hyper_adalora"} <= set(g):
        r = relative(g, "hyper_adalora", "adalora")
        checks.append(("hyper_adalora latency <= adalora's", src, f"{r:.4f}", r <= 1.0))
    return checks


def cpu_step_checks(results: str) -> List[Check]:
    """Target 1 from bench_cpu_step.py's interleaved run (the C++ engineer's script), if present."""
    for name in ("bench_cpu_step_cpuclock.csv", "bench_cpu_step.csv"):
        path = os.path.join(results, name)
        if os.path.exists(path):
            rows = {r["provider"]: r for r in read_csv(path)}
            checks = []
            for method in ("lora", "vera", "adalora"):
                row = rows.get(f"{method}_cpp")
                if row and row.get("overhead_vs_peft"):
                    r = float(row["overhead_vs_peft"])
                    checks.append((f"{method}: overhead <= 0.5x PEFT's", name, f"{r:.3f} (interleaved)", r <= 0.5))
            return checks
    return []


def csv_checks(results: str, suffix: str) -> List[Check]:
    checks: List[Check] = []
    peft = os.path.join(results, f"memory_profile_peft{suffix}.csv")
    if os.path.exists(peft):
        for row in read_csv(peft):
            r = float(row["ratio"])
            checks.append((f"{row['method']}: peak memory <= PEFT's", os.path.basename(peft),
                           f"{r:.4f} ({row['peftkern_peak_mb']} vs {row['peft_peak_mb']} MB)", r <= 1.0))
    else:
        checks.append(("peak memory <= PEFT's", os.path.basename(peft), "file missing", None))
    left = os.path.join(results, f"memory_profile_left{suffix}.csv")
    if os.path.exists(left):
        row = next(r for r in read_csv(left) if r["provider"] == "pg_pos")
        r = float(row["relative_to_lora"])
        checks.append(("pg_pos A_H B_L <= 1.03x lora per step", os.path.basename(left),
                       f"{r:.4f} (paper {row['paper_relative_to_lora']})", r <= 1.03))
    else:
        checks.append(("pg_pos A_H B_L <= 1.03x lora per step", os.path.basename(left), "file missing", None))
    hyper = os.path.join(results, f"memory_profile_hyper{suffix}.csv")
    if os.path.exists(hyper):
        rows = read_csv(hyper)
        lat = [float(r["latency_ratio"]) for r in rows]
        mem = [float(r["memory_ratio"]) for r in rows]
        per_batch = ", ".join(f"b{r['batch']}: {float(r['latency_ratio']):.3f}" for r in rows)
        checks.append(("hyper_adalora latency <= adalora's, every batch size", os.path.basename(hyper),
                       f"median {statistics.median(lat):.4f}, max {max(lat):.4f} ({per_batch})", max(lat) <= 1.0))
        checks.append(("hyper_adalora memory within 1% of adalora's", os.path.basename(hyper),
                       f"max |ratio - 1| {max(abs(m - 1) for m in mem):.4f}", max(abs(m - 1) for m in mem) <= 0.01))
    else:
        checks.append(("hyper_adalora latency and memory vs adalora", os.path.basename(hyper), "file missing", None))
    return checks


def suite_table(path: str) -> str:
    """The step suite's medians per group, with each provider's overhead over the floor."""
    if not os.path.exists(path):
        return f"({os.path.basename(path)} missing)"
    with open(path) as f:
        data = json.load(f)
    commit = data.get("commit_info", {})
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    lines = [f"- date: {data.get('datetime', '?')}; commit {str(commit.get('id', '?'))[:7]}"
             + (" (uncommitted changes)" if commit.get("dirty") else "") + f"; cpu {cpu}; timer "
             + str(data["benchmarks"][0].get("options", {}).get("timer", "?") if data["benchmarks"] else "?"), "",
             "| group | provider | median ms/step | over floor, ms | / floor |", "|---|---|---|---|---|"]
    for group, row in suite_medians(path).items():
        for provider, (m, floor) in row.items():
            floor = floor if floor is not None else row.get("floor", (None,))[0]
            over = f"{1e3 * (m - floor):.1f}" if floor else ""
            ratio = f"{m / floor:.4f}" if floor else ""
            lines.append(f"| {group} | {provider} | {1e3 * m:.1f} | {over} | {ratio} |")
    return "\n".join(lines)


def render(checks: List[Check]) -> str:
    lines = ["| target | source | measured | result |", "|---|---|---|---|"]
    for target, src, measured, ok in checks:
        lines.append(f"| {target} | {src} | {measured} | {'NO DATA' if ok is None else 'PASS' if ok else 'MISS'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="which bench_suite_<model>.json to read")
    ap.add_argument("--quick", action="store_true", help="read the *_quick memory_profile files")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--write", action="store_true", help="also write results/targets.md")
    args = ap.parse_args(argv)
    suite = os.path.join(args.results, f"bench_suite_{args.model}.json")
    checks = step_checks(suite) + cpu_step_checks(args.results)
    checks += csv_checks(args.results, "_quick" if args.quick else "")
    table = render(checks)
    print(table)
    if args.write:
        with open(os.path.join(args.results, "targets.md"), "w") as f:
            f.write("# Targets: latest results\n\nProvisional: from results measured on a shared machine.\n\n"
                    + table + f"\n\n## Step suite ({os.path.basename(suite)})\n\n" + suite_table(suite) + "\n")


if __name__ == "__main__":
    main()
