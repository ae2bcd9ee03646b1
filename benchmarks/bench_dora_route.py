"""DoRA's two routes side by side, one adapted module at a time: the column scale against g folded into W0.

For each of SmolLM2-135M's adapted Linear shapes and a few token counts M, one training step
(forward, backward, AdamW step) of a lone nn.Linear patched with lora r 8, and of the same patched
with ``use_dora=True`` on each route (``peftkern.ops.functions.dora_folds``):

    scaled   the adapter's output scaled in place forward, dz = dy⊙g written backward
    folded   g⊙W0 and g⊙v formed each way, the adapter's kernels on x and dy themselves

Interleaved in a rotating order, one torch thread, process CPU time, two warm-up steps; the table
gives LoRA's median step and the median over repetitions of each DoRA step over LoRA's step of
the same repetition, and which route the rule picks (folded when M ≥ 2K).

    python benchmarks/bench_dora_route.py            # results/bench_dora_route.md
    python benchmarks/bench_dora_route.py --quick    # tiny shapes: checks the script
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

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import peftkern  # noqa: E402
from peftkern.ops import functions  # noqa: E402

SHAPES = [(576, 1536, "gate_proj, up_proj"), (1536, 576, "down_proj"), (576, 576, "q_proj, o_proj"),
          (576, 192, "k_proj, v_proj")]
ROUTES = {"lora": None, "scaled": float("inf"), "folded": 0}


class One(torch.nn.Module):
    def __init__(self, K: int, N: int):
        super().__init__()
        self.proj = torch.nn.Linear(K, N, bias=False)

    def forward(self, x):
        return self.proj(x)


def _build(K: int, N: int, rank: int, dora: bool):
    torch.manual_seed(0)
    model = One(K, N)
    peftkern.patch(model, "lora", rank=rank, targets=["proj"], use_dora=dora)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def measure(K: int, N: int, M: int, rank: int, reps: int) -> dict:
    x, dy = torch.randn(M, K, requires_grad=True), torch.randn(M, N)
    built = {name: _build(K, N, rank, threshold is not None) for name, threshold in ROUTES.items()}
    times = {name: [] for name in ROUTES}
    default = functions.FOLD_MIN_ROWS_PER_FEATURE
    names = list(ROUTES)
    try:
        for rep in range(reps + 2):
            for name in names[rep % 3:] + names[:rep % 3]:  # a rotating order
                threshold = ROUTES[name]
                functions.FOLD_MIN_ROWS_PER_FEATURE = default if threshold is None else threshold
                model, opt = built[name]
                t0 = time.process_time()
                model(x).backward(dy)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if rep >= 2:
                    times[name].append(time.process_time() - t0)
    finally:
        functions.FOLD_MIN_ROWS_PER_FEATURE = default
    # each DoRA step over the LoRA step of the same repetition, then the median: the machine's
    # slow drifts (this VM's neighbours) cancel within a repetition
    out = {"lora": statistics.median(times["lora"])}
    for name in ("scaled", "folded"):
        out[name] = statistics.median(d / base for d, base in zip(times[name], times["lora"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="512,2048,4096")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_dora_route.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes, tokens = SHAPES, [int(t) for t in args.tokens.split(",")]
    if args.quick:
        shapes, tokens, args.reps = [(16, 24, "tiny")], [8, 64], 3
        args.out = os.path.join(HERE, "results", "bench_dora_route_quick.md")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=HERE).stdout.strip()
    lines = ["# DoRA's routes, one module's training step: column scale against g folded into W0", "",
             f"- date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}"
             f"{' (working tree has uncommitted changes)' if dirty else ''}, {platform.machine()} CPU, one torch "
             f"thread, process CPU time, torch {torch.__version__}",
             f"- lone nn.Linear [N, K] (no bias), lora r {args.rank} with and without use_dora, fp32; forward, "
             f"backward (dy random), AdamW step; {args.reps} interleaved repetitions after 2 warm-ups; LoRA's median, "
             "and each DoRA step's median ratio to LoRA's step in the same repetition",
             f"- `python benchmarks/bench_dora_route.py{' --quick' if args.quick else ''}`", "",
             "| module (SmolLM2-135M) | K→N | tokens M | LoRA ms | DoRA scaled / LoRA | DoRA folded / LoRA | "
             "the rule picks |", "|---|---|---:|---:|---:|---:|---|"]
    for K, N, where in shapes:
        for M in tokens:
            med = measure(K, N, M, args.rank, args.reps)
            pick = "folded" if functions.dora_folds(M, K, 0.0) else "scaled"
            row = (f"| {where} | {K}→{N} | {M} | {med['lora'] * 1e3:.2f} | {med['scaled']:.3f} | "
                   f"{med['folded']:.3f} | {pick} |")
            lines.append(row)
            print(row, flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
