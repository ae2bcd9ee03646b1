"""Two revisions of peftkern side by side: the per-module host time and the SmolLM2-shape CPU step.

Runs ``bench_module_host.py`` (one adapted module's forward + backward: Python, autograd and dispatch)
of this tree and of another checkout (``--old DIR``, built in place: its own ``peftkern/_C``)
alternately, ``--rounds`` times each, in fresh processes, and reports for each module the median
time divided by the frozen nn.Linear of the same process (which cancels the machine's load), and
the new/old ratio of those.

    python benchmarks/bench_revisions.py --old /path/to/old/checkout [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_module_host.py")], env=env,
                         capture_output=True, text=True, check=True, cwd=tree).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and "µs" not in line and not line.startswith("|---"):
            name, value = [c.strip() for c in line.strip("|").split("|")]
            rows[name] = float(value)
    return rows


def commit(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=tree).stdout.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "revisions_module_host.md")
    args = p.parse_args(argv)
    new = HERE.parent
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for key, tree in (("old", args.old), ("new", new)):
            runs[key].append(run(tree))
            print(key, runs[key][-1], flush=True)
    rel = {k: {name: statistics.median(r[name] / r["frozen nn.Linear"] for r in v) for name in v[0]}
           for k, v in runs.items()}
    lines = ["# Per-module host time, two revisions side by side", "",
             f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; old {commit(args.old)}, "
             f"new {commit(new)}; {args.rounds} alternating rounds of `benchmarks/bench_module_host.py` (fresh "
             "processes, one thread); each time divided by the frozen nn.Linear of its own process (the machine "
             "is shared), medians; `python benchmarks/bench_revisions.py --old DIR`", "",
             "| module | old × nn.Linear | new × nn.Linear | new / old |", "|---|---:|---:|---:|"]
    for name in rel["new"]:
        if name in rel["old"] and name != "frozen nn.Linear":
            o, n = rel["old"][name], rel["new"][name]
            lines.append(f"| {name} | {o:.2f} | {n:.2f} | {n / o:.3f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
