"""DoRA's weight norm alone: peftkern's against PEFT's, on the CPU.

‖W0 + s·B·A‖ per row, the norm DoRA divides by at every forward in training (the magnitude's
denominator, recomputed when W0 or the factors change: once per optimizer step).

    PEFT 0.21 (``peft.tuners.lora.dora.DoraLinearLayer.get_weight_norm``): forms ΔW = s·B·A [N, K]
              and W0 + ΔW [N, K], then the row norms: two N×K temporaries, 3 N×K passes.
    peftkern  (``peftkern.dora.weight_norm``): the expansion ‖W0‖² + 2s⟨W0·Aᵀ, B⟩ + s²‖B·A‖², in fp32:
              W0·Aᵀ [N, r] (formed as (A·W0ᵀ)ᵀ) is one pass over W0, ‖B·A‖² = rowsum(B·(A·Aᵀ) ⊙ B) is r-sized work, and
              ‖W0‖² is cached while W0 is unchanged (frozen: computed once), so a step costs one
              skinny GEMM over W0 and no N×K temporary.

Both are timed in one process, interleaved, by process CPU time with one torch thread (the
machine is shared), at 4096×4096 and 11008×4096 (Llama-7B's attention and MLP), r 8 and 64;
"ours, W0 norms cached" is the per-step cost in training, "ours, cold" includes ‖W0‖².
The largest difference between the two norms is printed beside the times.

    python benchmarks/bench_dora_norm.py [--reps 7]     writes results/bench_dora_norm.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from peftkern import dora  # noqa: E402


def peft_norm(weight, A, B, scale):
    """PEFT 0.21's get_weight_norm(weight, lora_weight, scaling), lora_weight = B @ A (its forward forms it)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    layer = DoraLinearLayer(fan_in_fan_out=False)
    return layer.get_weight_norm(weight, B @ A, scale)


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return statistics.median(out) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_dora_norm.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for N, K in ((4096, 4096), (11008, 4096)):
        torch.manual_seed(0)
        W = torch.randn(N, K) / K ** 0.5
        for r in (8, 64):
            A, B, s = torch.randn(r, K) / K ** 0.5, torch.randn(N, r) * 0.01, 2.0
            w0_sq = dora.row_norms_sq(W)
            theirs = timed(lambda: peft_norm(W, A, B, s), args.reps)
            cold = timed(lambda: dora.weight_norm(W, A, B, None, None, s), args.reps)
            warm = timed(lambda: dora.weight_norm(W, A, B, None, None, s, w0_sq), args.reps)
            diff = float((dora.weight_norm(W, A, B, None, None, s) - peft_norm(W, A, B, s)).abs().max())
            rows.append((N, K, r, theirs, cold, warm, diff))
            print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    lines = ["# DoRA's weight norm alone: peftkern vs PEFT (CPU)", "",
             f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
             f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch {torch.__version__}, one thread, "
             f"process CPU time, median of {args.reps}; fp32; `python benchmarks/bench_dora_norm.py`", "",
             "| N×K | r | PEFT ms | ours cold ms | ours, W0 norms cached ms | PEFT / ours cached | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for N, K, r, theirs, cold, warm, diff in rows:
        lines.append(f"| {N}×{K} | {r} | {theirs:.1f} | {cold:.1f} | {warm:.1f} | {theirs / warm:.1f} | {diff:.2e} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
