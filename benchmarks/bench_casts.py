"""The fp32 adapter of a bf16 model: its trained factors cast together (one autograd node per forward,
peftkern.casts) against a cast and a cast-back per factor, side by side in one process.

The adapter of a half-precision model is fp32 (``autocast_adapter_dtype``, PEFT's default). Each
forward needs its trained factors in bf16 and each backward their gradients back in fp32: per
factor, a cast and a cast-back, 4 launches a LoRA module. ``casts.py`` casts every trained factor of
the model in one node whose forward and backward are a multi-tensor copy each. Two figures, for the
GPU step's providers (bench_gpu_step.PROVIDERS) with and without it:

``launches``  ATen compute ops of one step on ``meta`` at the GPU step's shape (bench_launches.py's
              count; a ``_foreach_copy_`` counts once, on CUDA it is one launch per chunk of tensors).
``host_ms``   CPU wall time of the same step on the tiny model of bench_launches.py (22 layers, width
              64, 1 x 8 tokens) in **bf16**, so that the casts run: Python, autograd and dispatch,
              the host time a GPU step cannot go below. Interleaved repetitions, one thread, medians.

Not GPU figures.

    python benchmarks/bench_casts.py             # writes results/casts.{md,csv}
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_gpu_step as gpu  # noqa: E402
import bench_launches as launches  # noqa: E402

PROVIDERS = ["pk_lora_qv", "pk_lora_all", "pk_dora_qv", "pk_dora_all"]
MODES = ("together", "alone")


def stepper(name: str, how: str, s):
    """bench_launches' step of provider ``name``, its casts together (as patched) or ``alone``
    (bench_gpu_step.casts_alone: the hooks that cast them together taken off the model)."""
    build = gpu.PROVIDERS[name]
    return gpu.stepper(gpu.casts_alone(build) if how == "alone" else build, s, foreach=True)


def count(name: str, how: str, layers: int) -> int:
    step, _ = stepper(name, how, launches.Shape("meta", layers, tiny=False))
    step(0)
    with launches.CountLaunches() as c:
        step(1)
    return sum(c.ops.values())


def host_times(names: List[str], layers: int, reps: int, steps: int) -> Dict[tuple, List[float]]:
    torch.set_num_threads(1)
    s = launches.Shape("cpu", layers, tiny=True)
    s.dtype = torch.bfloat16
    steppers = {}
    for name in names:
        for how in MODES:
            step, _ = stepper(name, how, s)
            for i in range(3):
                step(i)
            steppers[(name, how)] = step
    return launches.interleaved(steppers, reps, steps)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    names = args.providers.split(",")
    unknown = [n for n in names if n not in gpu.PROVIDERS]
    if unknown:
        p.error(f"unknown provider(s) {unknown}; valid: {', '.join(gpu.PROVIDERS)}")
    rows = []
    counts = {(n, how): count(n, how, args.layers) for n in names for how in MODES}
    host = host_times(names, args.layers, args.reps, 3)
    for n in names:
        alone, together = counts[(n, "alone")], counts[(n, "together")]
        h_alone, h_together = statistics.median(host[(n, "alone")]), statistics.median(host[(n, "together")])
        rows.append({"provider": n, "launches_alone": alone, "launches_together": together,
                     "launches_ratio": round(together / alone, 3), "host_ms_alone": round(h_alone, 2),
                     "host_ms_together": round(h_together, 2), "host_ratio": round(h_together / h_alone, 3)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    with open(out / "casts.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    meta = {"what": f"launches: ATen ops of one step on meta at the GPU step's shape (Llama {args.layers} layers, "
                    "hidden 2048, bf16 model, fp32 adapter, batch 8x512); host_ms: CPU wall time of that step at "
                    f"width 64, 1x8 tokens, bf16 ({args.layers} layers, one thread, median of {args.reps} interleaved "
                    "repetitions of 3 steps). Not GPU figures.",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": gpu.commit(), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "command": "python benchmarks/bench_casts.py"}
    lines = ["# The trained factors cast together or alone (no GPU involved)", "",
             *[f"- {k}: {v}" for k, v in meta.items()], "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             *["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]]
    (out / "casts.md").write_text("\n".join(lines) + "\n")
    print((out / "casts.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
