"""QLoRA on a real model: SmolLM2-135M-Instruct fine-tuned on GSM8K with a 4-bit base, beside full precision.

Each fine-tune is what a user types (``peftkern finetune --task sft``), once with the full-precision
checkpoint and once with ``--load-in-4bit`` (bitsandbytes NF4, double quantization, the adapter on
the dequantizing bitsandbytes op), at the same data, rate and seed as the SFT table's selection runs:

    data      the shipped GSM8K sample: training problems 0-95, held-out problems 900-947 (loss only)
    budget    one epoch of batch 8 (12 steps), 384 tokens, q_proj and v_proj, rank 8, rate 1e-2, seed 100
    untrained the held-out loss of the model before any step (LoRA's B = 0: the base itself), through
              the same pipeline, so the table separates what quantization costs from what training recovers

    python benchmarks/qlora_sft.py                  # about 45 minutes on 2 cores
    python benchmarks/qlora_sft.py --seeds 100 482 584 --methods lora   # more seeds (10-13 min a run)
    python benchmarks/qlora_sft.py --render         # rewrite the .md from the .jsonl

With more than one seed, the table gives each loss as mean ± sample standard deviation over the
seeds, and NF4 − full as the mean of each seed's difference (the same seed for both bases).

Writes results/qlora_sft.{md,jsonl} (each run appended as it finishes; a rerun skips what is there).
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
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from peftkern.app import sft  # noqa: E402

DATA = HERE.parent / "peftkern" / "data" / "gsm8k"
BASES = {"full precision": None, "NF4": "nf4"}
METHODS = ("untrained", "lora", "pg_pos")


def _subset(path: Path, start: int, n: int, out: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if line.strip()][start:start + n]
    out.write_text("\n".join(lines) + "\n")
    return str(out)


def _run(method: str, quant, train: str, held: str, seed: int) -> dict:
    cfg = sft.SFTConfig(data=train, eval_data=held, method="lora" if method == "untrained" else method, rank=8,
                        lr=1e-2, lr_source="qlora_sft", epochs=1, batch_size=8, max_length=384, seed=seed,
                        progress=False, output_dir=None, load_in_4bit=quant)
    if method == "untrained":  # evaluate only: the same pipeline, no step taken
        from trl import SFTTrainer

        with mock.patch.object(SFTTrainer, "train", lambda self, *a, **k: None):
            r = sft.finetune_sft(cfg)
    else:
        r = sft.finetune_sft(cfg)
    return {"method": method, "load_in_4bit": quant, "seed": seed, "eval_loss": r.config["metrics"]["eval_loss"],
            "step_seconds": r.config["step_seconds"], "trainable": r.trainable["adapter"], "seconds": r.seconds,
            "precision": r.config["precision"], "how": f"benchmarks/qlora_sft.py at {_commit()}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"}


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=HERE).stdout.strip()


def _seed(r: dict) -> int:
    return r.get("seed", 100)  # the first runs (2026-12-04) predate the field; all were seed 100


def _cell(losses) -> str:
    if not losses:
        return "not run"
    if len(losses) == 1:
        return f"{losses[0]:.3f}"
    return f"{statistics.mean(losses):.3f} ± {statistics.stdev(losses):.3f} (n={len(losses)})"


def _table(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["load_in_4bit"]), {})[_seed(r)] = r
    seeds = sorted({_seed(r) for r in rows})
    lines = ["# QLoRA on SmolLM2-135M-Instruct: GSM8K held-out loss, 4-bit base beside full precision", "",
             f"- table written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC at commit {_commit()} "
             "(each run's own commit and date are listed below); "
             f"machine: {platform.machine()} CPU, 2 cores; `python benchmarks/qlora_sft.py`",
             "- budget: GSM8K training problems 0-95, one epoch of batch 8 (12 steps), 384 tokens, q_proj and v_proj, "
             f"rank 8, rate 1e-2, seeds {', '.join(map(str, seeds))} (each row says which ran), TRL SFTTrainer, "
             "completion-only loss, bf16 autocast; held-out: training problems 900-947",
             "- with several seeds: mean ± sample standard deviation; NF4 − full is the mean of each seed's "
             "difference, over the seeds run on both bases", "",
             "| method | adapter params | seeds | held-out loss, full precision | held-out loss, NF4 base | NF4 − full |",
             "|---|---:|---|---:|---:|---:|"]
    for method in METHODS:
        full, q = by.get((method, None), {}), by.get((method, "nf4"), {})
        if not full and not q:
            continue
        any_run = next(iter((full or q).values()))
        params = "0 (the base)" if method == "untrained" else f"{any_run['trainable']:,}"
        both = sorted(set(full) & set(q))
        diffs = [q[s]["eval_loss"] - full[s]["eval_loss"] for s in both]
        diff = ""
        if len(diffs) == 1:
            diff = f"{diffs[0]:+.3f}"
        elif diffs:
            diff = f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}"
        ran = sorted(set(full) | set(q))
        lines.append(f"| {method} | {params} | {', '.join(map(str, ran))} | "
                     f"{_cell([full[s]['eval_loss'] for s in sorted(full)])} | "
                     f"{_cell([q[s]['eval_loss'] for s in sorted(q)])} | {diff} |")
    lines += ["", "Where each row came from:", ""]
    lines += [f"- {r['method']}, {r['load_in_4bit'] or 'full precision'}, seed {_seed(r)}: {r['how']}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--render", action="store_true", help="only rewrite the .md table from the .jsonl runs")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--seeds", type=int, nargs="+", default=[100])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log, table = args.out / "qlora_sft.jsonl", args.out / "qlora_sft.md"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not args.render:
        tmp = Path(tempfile.mkdtemp(prefix="qlora-sft-"))
        train = _subset(DATA / "train.jsonl", 0, 96, tmp / "train.jsonl")
        held = _subset(DATA / "train.jsonl", 900, 48, tmp / "held.jsonl")
        for seed in args.seeds:
            for method in args.methods:
                if method == "untrained" and seed != args.seeds[0]:
                    continue  # no step taken: the seed changes nothing
                for quant in BASES.values():
                    if any(r["method"] == method and r["load_in_4bit"] == quant and _seed(r) == seed for r in rows):
                        continue
                    rows.append(_run(method, quant, train, held, seed))
                    with open(log, "a") as f:
                        f.write(json.dumps(rows[-1]) + "\n")
                    table.write_text(_table(rows))
    table.write_text(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
