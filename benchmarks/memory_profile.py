"""Reproduce two efficiency tables of the seed papers with this engine.

HyperAdaLoRA Table 4 ("hyper"): peak memory (MB) and latency (ms/step) of AdaLoRA vs
HyperAdaLoRA at batch sizes 1, 2, 4, ..., 64 on RoBERTa-base's shape (random weights,
sequence classification, targets query/value), sequence length 128. Latency: both methods
timed interleaved in one process per batch size. Memory: a fresh process per point; on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the process's peak RSS (VmHWM) over the
training steps, reset right before the first step (so it is the whole process, base model
included, during the steps; ``before_mb`` is its RSS right before them).

LEFT Table 13 ("left"): relative training time per step of LoRA and of PG-Fixed,
PG-Trainable and PG-Pos in A_H B_L, A_H B_H and A_L B_H, normalised to LoRA, next to the
paper's ratios from its Table 13 (rank 8, average hours over GLUE). The paper's rows are
identified by their trainable-parameter counts, which this engine reproduces on TinyLlama
(the count columns): the row that the paper's text extraction labels "LoRA A_L B_H" has
PG-Fixed A_L B_H's count (1,108,388) and is listed as such.

Ours vs PEFT ("peft"): peak memory of a training step of lora, vera and adalora against
PEFT's, and the frozen floor, on SmolLM2-135M's shape (a fresh process per provider).

    python benchmarks/memory_profile.py                       # all three tables, full size
    python benchmarks/memory_profile.py --quick               # tiny shapes, seconds (smoke)
    python benchmarks/memory_profile.py --table hyper --batch-sizes 1,2,4 --reps 3
    python benchmarks/memory_profile.py --table left --left-layers 4

Results: benchmarks/results/memory_profile_{hyper,left,peft}[_quick].{md,csv,png}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    ADALORA_SCHEDULE,
    CLOCKS,
    HYPER_SCHEDULE,
    MODELS,
    PROVIDERS,
    RESULTS,
    bench_device,
    build_base,
    machine,
    make_batch,
    measure_steps_memory,
    ours,
    peak_memory_child,
    time_interleaved,
    vera_rank,
    write_table,
)

HYPER_METHODS = {
    "adalora": lambda rank: ours("adalora", rank=rank, **ADALORA_SCHEDULE),
    "hyper_adalora": lambda rank: ours("hyper_adalora", rank=rank, alpha=None, **HYPER_SCHEDULE),
}
# HyperAdaLoRA Table 4 (A100, RoBERTa-base): batch -> (AdaLoRA MB, ms, HyperAdaLoRA MB, ms).
PAPER_TABLE4 = {1: (2758, 123.16, 2722, 118.10), 2: (2798, 132.60, 2764, 118.82), 4: (3232, 149.38, 3196, 134.54),
                8: (4115, 189.39, 4078, 178.51), 16: (5906, 284.33, 5870, 272.72), 32: (9600, 486.16, 9564, 465.77),
                64: (16566, 882.55, 16530, 872.80)}

# LEFT Table 13, rank 8, "Avg." column (hours): provider -> (config label, trainable params, hours).
PAPER_TABLE13_R8 = {
    "lora": ("LoRA A_L B_L", 1_126_400, 0.76),
    "pg_fixed": ("PG-Fixed A_H B_L", 1_094_052, 0.92),
    "pg_fixed_AH_BH": ("PG-Fixed A_H B_H", 1_076_040, 0.70),
    "pg_fixed_AL_BH": ("PG-Fixed A_L B_H", 1_108_388, 0.70),
    "pg_trainable": ("PG-Trainable A_H B_L", 1_094_492, 0.92),
    "pg_trainable_AH_BH": ("PG-Trainable A_H B_H", 1_076_920, 0.71),
    "pg_trainable_AL_BH": ("PG-Trainable A_L B_H", 1_108_828, 0.70),
    "pg_pos": ("PG-Pos A_H B_L", 1_094_892, 0.92),
    "pg_pos_AH_BH": ("PG-Pos A_H B_H", 1_077_720, 0.71),
    "pg_pos_AL_BH": ("PG-Pos A_L B_H", 1_109_228, 0.70),
}


# --- HyperAdaLoRA Table 4 ----------------------------------------------------------------------


def hyper_spec(args, batch: int):
    return MODELS[args.hyper_model].with_(batch=batch, seq=args.seq, layers=args.hyper_layers)


def hyper_table(args) -> List[Dict]:
    device = bench_device()
    rows = []
    for b in args.batch_sizes:
        spec = hyper_spec(args, b)
        base = build_base(spec)
        batch = make_batch(spec)
        runners = {m: make(args.rank)(base, spec) for m, make in HYPER_METHODS.items()}
        times = time_interleaved(runners, batch, args.reps, args.warmup, _clock(args, device))
        del runners, base
        row = {"batch": b}
        for m in HYPER_METHODS:
            mem = child(args, "hyper", m, b)
            row[f"{m}_peak_mb"] = round(mem["peak_mb"], 1)
            row[f"{m}_before_mb"] = round(mem["before_mb"], 1)
            row[f"{m}_ms"] = round(1e3 * statistics.median(times[m]), 2)
        row["latency_ratio"] = round(row["hyper_adalora_ms"] / row["adalora_ms"], 4)
        row["memory_ratio"] = round(row["hyper_adalora_peak_mb"] / row["adalora_peak_mb"], 4)
        paper = PAPER_TABLE4.get(b)
        row["paper_latency_ratio"] = round(paper[3] / paper[1], 4) if paper else ""
        row["paper_memory_ratio"] = round(paper[2] / paper[0], 4) if paper else ""
        rows.append(row)
        print(row, flush=True)
    return rows


# --- LEFT Table 13 -----------------------------------------------------------------------------


def left_spec(args):
    return MODELS[args.left_model].with_(layers=args.left_layers, batch=args.left_batch, seq=args.seq)


def left_table(args) -> List[Dict]:
    device = bench_device()
    spec = left_spec(args)
    base = build_base(spec)
    batch = make_batch(spec)
    runners = {name: PROVIDERS[name].make(base, spec) for name in PAPER_TABLE13_R8}
    times = time_interleaved(runners, batch, args.reps, args.warmup, _clock(args, device))
    med = {n: statistics.median(t) for n, t in times.items()}
    import peftkern

    rows = []
    for name, (label, paper_params, hours) in PAPER_TABLE13_R8.items():
        rows.append({"config": label, "provider": name, "ms_per_step": round(1e3 * med[name], 1),
                     "relative_to_lora": round(med[name] / med["lora"], 4),
                     "paper_relative_to_lora": round(hours / PAPER_TABLE13_R8["lora"][2], 4),
                     "trainable_params": peftkern.count(runners[name].model).adapter_trainable,
                     "paper_trainable_params_tinyllama": paper_params})
    return rows


# --- ours vs PEFT: peak memory of one training step ---------------------------------------------

PEFT_PAIRS = [("lora", "peft_lora"), ("vera", "peft_vera"), ("adalora", "peft_adalora")]


def peft_spec(args):
    return MODELS[args.peft_model].with_(layers=args.peft_layers)


def peft_table(args) -> List[Dict]:
    rows = []
    floor = child(args, "peft", "floor", 0)
    for mine, theirs in PEFT_PAIRS:
        a, b = child(args, "peft", mine, 0), child(args, "peft", theirs, 0)
        rows.append({"method": mine, "peftkern_peak_mb": round(a["peak_mb"], 1), "peft_peak_mb": round(b["peak_mb"], 1),
                     "floor_peak_mb": round(floor["peak_mb"], 1), "peftkern_before_mb": round(a["before_mb"], 1),
                     "peft_before_mb": round(b["before_mb"], 1),
                     "peftkern_minus_floor_mb": round(a["peak_mb"] - floor["peak_mb"], 1),
                     "peft_minus_floor_mb": round(b["peak_mb"] - floor["peak_mb"], 1),
                     "ratio": round(a["peak_mb"] / b["peak_mb"], 4)})
        print(rows[-1], flush=True)
    return rows


def write_peft(args, rows, info, stem):
    spec = peft_spec(args)
    notes = settings(args)[:2] + [
        f"model: {spec.describe()}",
        "providers as in the step suite (common.PROVIDERS): r=8, alpha 16 (VeRA r=" + str(vera_rank(spec)) + "); "
        "floor = frozen model, activations-only backward, no optimizer",
        f"memory: {memory_kind()}; {args.memory_steps} training steps per fresh process"]
    write_table(stem, "Peak memory of a training step: peftkern vs PEFT", notes, rows, info)


def memory_kind() -> str:
    if bench_device().type == "cuda":
        return "torch.cuda.max_memory_allocated (MB)"
    return ("peak RSS (VmHWM, MB) of a fresh process per point, reset right before the first training step: the "
            "whole process (interpreter, base model, adapter, optimizer, activations) during the steps; "
            "before_mb is its RSS right before the steps; children run with glibc's mmap threshold fixed at 128 KiB "
            "(MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the RSS")


# --- memory children ---------------------------------------------------------------------------


def child(args, table: str, method: str, batch: int) -> Dict[str, float]:
    argv = ["--child", f"{table}:{method}:{batch}"] + args.passthrough
    return peak_memory_child(argv, os.path.abspath(__file__))


def run_child(args) -> None:
    import json

    table, method, batch = args.child.split(":")
    if table == "hyper":
        spec, make = hyper_spec(args, int(batch)), HYPER_METHODS[method](args.rank)
    else:
        spec, make = peft_spec(args), PROVIDERS[method].make
    base = build_base(spec)
    data = make_batch(spec)
    runner = make(base, spec)
    print(json.dumps(measure_steps_memory(runner, data, steps=args.memory_steps, device=bench_device())))


# --- output ------------------------------------------------------------------------------------


def _clock(args, device):
    if device.type == "cuda":  # CUDA kernels are asynchronous: time to a synchronise
        def synced():
            torch.cuda.synchronize()
            return time.perf_counter()
        return synced
    return CLOCKS[args.clock]


def settings(args) -> List[str]:
    device = bench_device()
    clock = "CUDA-synchronised wall time" if device.type == "cuda" else (
        "process CPU time (time.process_time)" if args.clock == "cpu" else "wall time")
    out = [f"device: {device.type}, dtype {'bf16' if device.type == 'cuda' else 'fp32'}",
           f"timing: median of {args.reps} interleaved steps after {args.warmup} warm-up step(s) per method; "
           f"clock: {clock}; torch threads {torch.get_num_threads()}",
           "one step = forward (loss + orthogonality regulariser) + backward + AdamW step + allocation "
           "(ΔT = 1, tinit = tfinal = 0)"]
    if args.quick:
        out.insert(0, "QUICK smoke run: tiny shapes, not a measurement")
    out.insert(0, "Provisional unless stated otherwise: measured on a shared machine.")
    return out


def write_hyper(args, rows, info, stem):
    spec = hyper_spec(args, args.batch_sizes[0])
    mem = f"{memory_kind()}; {args.memory_steps} training steps per point"
    notes = settings(args) + [
        f"model: {spec.describe().split('; batch')[0]}; sequence length {args.seq}; batch sizes "
        f"{', '.join(map(str, args.batch_sizes))}; adalora target_r {args.rank} (init_r {round(1.5 * args.rank)}); "
        "hyper_adalora: attention hypernetwork, state_update fixed",
        f"memory: {mem}",
        "paper ratios: HyperAdaLoRA / AdaLoRA from the paper's Table 4 (A100 GPU, its own settings)"]
    write_table(stem, "HyperAdaLoRA Table 4: AdaLoRA vs HyperAdaLoRA, memory and latency per step", notes, rows, info)
    plot(stem, "batch size", [("adalora ms/step", [r["batch"] for r in rows], [r["adalora_ms"] for r in rows]),
                              ("hyper_adalora ms/step", [r["batch"] for r in rows],
                               [r["hyper_adalora_ms"] for r in rows])],
         [("adalora MB", [r["batch"] for r in rows], [r["adalora_peak_mb"] for r in rows]),
          ("hyper_adalora MB", [r["batch"] for r in rows], [r["hyper_adalora_peak_mb"] for r in rows])],
         "HyperAdaLoRA Table 4 on " + spec.name)


def write_left(args, rows, info, stem):
    spec = left_spec(args)
    full = MODELS[args.left_model].layers
    notes = settings(args) + [
        f"model: {spec.describe()}" + (f" (FEWER LAYERS than the real {full})" if spec.layers != full else ""),
        "methods: rank 8, alpha 16, targets q_proj/v_proj; PG hypernetworks h1 = h2 = 20, one for all layers",
        "paper_relative_to_lora: the paper's Table 13 average hours (rank 8) divided by LoRA's 0.76 h; "
        "rows matched by trainable-parameter count (the paper's counts are for the full 22-layer TinyLlama)"]
    write_table(stem, "LEFT Table 13: training time per step relative to LoRA", notes, rows, info)
    labels = [r["config"] for r in rows]
    plot(stem, None, [("measured", labels, [r["relative_to_lora"] for r in rows]),
                      ("paper", labels, [r["paper_relative_to_lora"] for r in rows])], None,
         "LEFT Table 13: time per step / LoRA on " + spec.name, bars=True)


def plot(stem, xlabel, left_series, right_series, title, bars=False):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    panels = [left_series] + ([right_series] if right_series else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + (3 if bars else 0), 4.5), squeeze=False)
    for ax, series in zip(axes[0], panels):
        for i, (label, xs, ys) in enumerate(series):
            if bars:
                pos = [j + 0.4 * i for j in range(len(xs))]
                ax.bar(pos, ys, width=0.4, label=label)
                ax.set_xticks([j + 0.2 for j in range(len(xs))], xs, rotation=45, ha="right", fontsize=7)
                ax.axhline(1.0, color="grey", lw=0.8)
            else:
                ax.plot(xs, ys, marker="o", label=label)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", choices=["hyper", "left", "peft", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 batch sizes, 2 reps: a smoke run")
    ap.add_argument("--batch-sizes", help="comma-separated (default 1,2,4,8,16,32,64)")
    ap.add_argument("--seq", type=int, help="sequence length (default 128)")
    ap.add_argument("--rank", type=int, default=8, help="adalora/hyper_adalora target_r (Table 4)")
    ap.add_argument("--hyper-model", choices=sorted(MODELS), help="default roberta-base")
    ap.add_argument("--hyper-layers", type=int, help="override the number of layers (Table 4)")
    ap.add_argument("--left-model", choices=sorted(MODELS), help="default tinyllama")
    ap.add_argument("--left-layers", type=int, help="override TinyLlama's 22 layers (Table 13)")
    ap.add_argument("--left-batch", type=int, help="Table 13 batch size (default 4)")
    ap.add_argument("--peft-model", choices=sorted(MODELS), help="ours vs PEFT memory table (default smollm2)")
    ap.add_argument("--peft-layers", type=int, help="override the number of layers (ours vs PEFT)")
    ap.add_argument("--reps", type=int, help="timed steps per method (default 7)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--memory-steps", type=int, default=2, help="steps a memory child runs after the reset")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, with --clock cpu)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="CPU only: cpu = process CPU time (stable on a shared machine), wall = elapsed")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = dict(batch_sizes="1,2", seq=16, hyper_model="tiny-roberta", left_model="tiny", left_batch=2, reps=2,
                 peft_model="tiny")
    full = dict(batch_sizes="1,2,4,8,16,32,64", seq=128, hyper_model="roberta-base", left_model="tinyllama",
                left_batch=4, reps=7, peft_model="smollm2")
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    if any(b <= 0 for b in args.batch_sizes):
        raise SystemExit(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    torch.set_num_threads(args.threads)
    args.passthrough = [f"--seq={args.seq}", f"--rank={args.rank}", f"--hyper-model={args.hyper_model}",
                        f"--memory-steps={args.memory_steps}", f"--threads={args.threads}",
                        f"--batch-sizes={args.batch_sizes[0]}", f"--peft-model={args.peft_model}"]
    for flag in ("hyper_layers", "peft_layers"):
        if getattr(args, flag):
            args.passthrough.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        run_child(args)
        return
    t0 = time.perf_counter()
    suffix = "_quick" if args.quick else ""
    tables = (("hyper", hyper_table, write_hyper), ("left", left_table, write_left), ("peft", peft_table, write_peft))
    for table, build, write in tables:
        if args.table not in (table, "all"):
            continue
        rows = build(args)
        stem = os.path.join(args.out_dir, f"memory_profile_{table}{suffix}")
        write(args, rows, machine(), stem)
        print(open(stem + ".md").read())
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
