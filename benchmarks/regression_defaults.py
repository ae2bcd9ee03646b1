"""Regression at the command line's defaults: SICK-R relatedness, every method, 3 seeds.

Each run is exactly what a user types, ``peftkern finetune --task sickr --data-dir DIR --method M
--seed S``: the short budget (3 epochs of batch 32 over SICK-R's 4,439 training pairs, 128
tokens), the method's short-budget learning rate, and Pearson's r on SICK-R's test set (4,906
pairs). ``--ablation`` adds LoRA and PG-Pos with the fresh regression head at transformers' own
init (``regression_head="zero"``, the behaviour before the fix): side by side, in one run.

    python benchmarks/regression_defaults.py [--data-dir ../shared/data] [--ablation]

Writes results/regression_defaults.{md,jsonl} (each run appended as it finishes; a rerun skips
what is there).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from peftkern.app import cli, train  # noqa: E402
from peftkern.methods import registry  # noqa: E402

SEEDS = (100, 482, 584)
DEFAULT_DATA = os.environ.get("PEFTKERN_DATA_DIR", str(HERE.parent.parent / "shared" / "data"))
BAR = {"lora": 0.75, "pg_pos": 0.75}  # the bar; 0.60 for every other method


def _config(method, seed, data_dir, head):
    args = cli.build_parser().parse_args(["finetune", "--task", "sickr", "--data-dir", data_dir, "--method", method,
                                          "--seed", str(seed), "--no-progress"])
    cfg = cli.run_config(args)
    cfg.output_dir, cfg.regression_head = None, head
    return cfg


def _run(cfg) -> dict:
    method, seed, head = cfg.method, cfg.seed, cfg.regression_head
    r = train.finetune(cfg)
    return {"method": method, "seed": seed, "head": head, "pearson": r.value, "lr": cfg.lr,
            "max_grad_norm": cfg.max_grad_norm or None,
            "epochs": [round(e["eval_metric"], 4) for e in r.epochs], "seconds": r.seconds,
            "train": r.sizes["train"], "eval": r.sizes["eval"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="holds SICK-R/{train,test}.tsv")
    p.add_argument("--methods", default=",".join(registry.names()))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--ablation", action="store_true")
    p.add_argument("--note", default="", help="a line written under the table (e.g. which runs predate a change)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "regression_defaults.jsonl"
    runs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    # the bar first (lora and pg_pos, every seed), then seed-major: a run cut short has every
    # method at the first seeds
    methods = args.methods.split(",")
    first = [m for m in ("lora", "pg_pos") if m in methods]
    seeds = [int(x) for x in args.seeds.split(",")]
    plan = [(m, s, "mean") for m in first for s in seeds]
    plan += [(m, s, "mean") for s in seeds for m in methods if m not in first]
    if args.ablation:
        plan = [(m, s, "zero") for m in ("lora", "pg_pos") for s in SEEDS] + plan
    for method, seed, head in plan:
        cfg = _config(method, seed, args.data_dir, head)
        key = (method, seed, head, cfg.lr, cfg.max_grad_norm or None)
        if any((r["method"], r["seed"], r["head"], r["lr"], r.get("max_grad_norm")) == key for r in runs):
            continue  # done at today's defaults
        row = _run(cfg)
        runs.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        (args.out / "regression_defaults.md").write_text(_table(runs, args.note))
    (args.out / "regression_defaults.md").write_text(_table(runs, args.note))
    return 0


def _table(runs, note="") -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    lines = ["# SICK-R at the command line's defaults", "",
             f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
             f"{platform.machine()} CPU (2 cores), torch; `python benchmarks/regression_defaults.py --ablation`",
             "- each run: `peftkern finetune --task sickr --data-dir DIR --method M --seed S`: MiniLM, 3 epochs of "
             "batch 32 over the 4,439 training pairs, 128 tokens, the method's short-budget rate; Pearson's r on "
             "the 4,906 test pairs; seeds 100, 482, 584 (mean ± sample std)",
             "- head: `mean`, the fresh regression head starts at the training targets' mean (the default); "
             "`zero`, at transformers' init (before the fix)", "",
             "| method | head | lr | clip | Pearson by seed | mean ± std | bar |", "|---|---|---:|---|---|---:|---|"]
    keys = list(dict.fromkeys((r["method"], r["head"], r["lr"], r.get("max_grad_norm")) for r in runs))
    for method, head, lr, clip in keys:
        rs = sorted((r for r in runs if (r["method"], r["head"], r["lr"], r.get("max_grad_norm")) == (method, head, lr, clip)),
                    key=lambda r: r["seed"])
        values = [r["pearson"] for r in rs]
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        bar = BAR.get(method, 0.60)
        default = registry.default_lr(method, "regression")[0] == lr and clip is None
        verdict = ("met" if mean >= bar else "missed") if head == "mean" and len(values) == len(SEEDS) else ""
        verdict += "" if default or head != "mean" else " (not today's defaults)"
        lines.append(f"| {method} | {head} | {rs[0]['lr']:g} | {clip or '-'} | {', '.join(f'{v:.3f}' for v in values)} | "
                     f"{mean:.3f} ± {std:.3f} | ≥ {bar:.2f} {verdict} |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
