"""Choose each method's learning rate for the embedded demo (``peftkern finetune`` with no task).

The demo trains the pretrained MiniLM on the SST-2 sample shipped in the package for a short
budget (3 epochs of batch 32, 189 steps). The papers' learning rates suit their budgets
(LEFT: 5e-5 for 10 epochs on full GLUE) and learn nothing here, and no single rate suits
every method (benchmarks/results/demo_defaults.md), so each method gets its own, chosen
here on a held-out tenth of the sample's *training* data (``--split-dev``): the sample's dev
set, which the demo reports, plays no part in the choice.

    python benchmarks/demo_defaults.py [--grid 5e-4,2e-3,5e-3,1e-2] [--seed 100]

Writes benchmarks/results/demo_defaults.{md,csv}: every (method, rate) with its held-out
accuracy, and the chosen rate (the best held-out accuracy; the smaller rate on a tie). The
rates registered as ``Method.demo_lr`` in peftkern/methods/ are copied from that table.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

import peftkern
from peftkern.app import cli, train

HERE = Path(__file__).resolve().parent


def run_one(method: str, lr: float, seed: int, out: Path) -> dict:
    config = train.RunConfig(model=train.default_model(), task=cli.DEMO_TASK, data_dir=train.embedded_data_dir(),
                             method=method, alpha=None, lr=lr, seed=seed, split_dev=True, progress=False,
                             output_dir=str(out / f"{method}-{lr:g}"),
                             **{k: v for k, v in cli.DEMO.items() if k != "lr"})
    result = train.finetune(config)
    best = max(result.epochs, key=lambda e: e["dev_metric"])
    return {"method": method, "lr": lr, "heldout": best["dev_metric"], "epoch": best["epoch"],
            "seconds": result.seconds, "seed": seed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="5e-4,2e-3,5e-3,1e-2")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--methods", default=",".join(peftkern.methods()))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--runs-dir", default=str(HERE.parent / "runs" / "demo_defaults"))
    args = ap.parse_args(argv)
    grid = [float(x) for x in args.grid.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = previous(out, args.seed)  # a later call extends the grid of some methods (e.g. --methods vera)
    grid = sorted(set(grid) | {r["lr"] for r in rows})
    for method in args.methods.split(","):
        for lr in (float(x) for x in args.grid.split(",")):
            rows = [r for r in rows if (r["method"], r["lr"]) != (method, lr)]
            rows.append(run_one(method, lr, args.seed, Path(args.runs_dir)))
            print(rows[-1], flush=True)
            write(rows, out, grid, args.seed)
    return 0


def previous(out: Path, seed: int) -> list:
    """The rows of an earlier run with the same seed (demo_defaults.csv), so that runs add up."""
    path = out / "demo_defaults.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if rows and int(rows[0].get("seed", seed)) != seed:
        return []
    return [{"method": r["method"], "lr": float(r["lr"]), "heldout": float(r["heldout"]), "epoch": int(r["epoch"]),
             "seconds": float(r["seconds"]), "seed": seed} for r in rows]


def write(rows, out: Path, grid, seed: int) -> None:
    rows = sorted(rows, key=lambda r: (r["method"], r["lr"]))
    with open(out / "demo_defaults.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["# Demo learning rates, chosen on held-out training data", "",
             f"`python benchmarks/demo_defaults.py --grid {','.join(f'{g:g}' for g in grid)} --seed {seed}`: "
             "the embedded demo's budget (MiniLM, the shipped SST-2 sample, 3 epochs, batch 32, max length 64, "
             "each method's default rank and alpha) with the training sample split 9:1; accuracy on the held-out "
             "tenth (best epoch). The sample's dev set is not used.",
             f"Machine: {platform.node() or 'unknown'}, {platform.platform()}, torch {torch.__version__}, "
             f"{os.cpu_count()} CPUs; {datetime.date.today().isoformat()}.", "",
             "| method | " + " | ".join(f"lr {g:g}" for g in grid) + " | chosen |", "|---|" + "---:|" * (len(grid) + 1)]
    for m in methods:
        mine = {r["lr"]: r["heldout"] for r in rows if r["method"] == m}
        best = max(mine.items(), key=lambda kv: (kv[1], -kv[0]))[0]
        cells = [f"{mine[g]:.4f}" if g in mine else "" for g in grid]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {best:g} |")
    (out / "demo_defaults.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
