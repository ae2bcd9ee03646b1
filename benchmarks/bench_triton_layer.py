"""Layer benchmark: one adapted linear layer, forward and forward+backward, by provider.

Providers:
    cublas_frozen        y = x·W0ᵀ alone (the floor: what the frozen layer costs)
    triton_prior_shrink  our fused Triton op, default forward variant (shrink kernel, then GEMM)
    triton_in_loop       our fused Triton op, x·Aᵀ computed inside the GEMM's K-loop
    peft_lora            PEFT's LoRA Linear layer (dropout 0)
    unsloth_addmm        an Unsloth-style autograd Function: matmul + addmm_, hand-written backward
    torch_backend        peftkern's "torch" backend

Shapes: M = 4096 tokens, K = N in {2048, 4096}, r in {8, 16, 32}, bf16. "fwd" is a training
forward (inputs require grad, so each provider saves what its backward needs); "fwd+bwd"
adds the backward with x, A and B trained. Times are triton.testing.do_bench medians.

    python benchmarks/bench_triton_layer.py              # needs CUDA; skips cleanly without it
    python benchmarks/bench_triton_layer.py --smoke      # one tiny fp32 shape on the CPU, interpreter

Writes <out>/triton_layer_<device>_<date>.md and .csv (default out: benchmarks/results/),
headed with the device, date and git commit.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
FULL_SHAPES = [(4096, kn, kn, r) for kn in (2048, 4096) for r in (8, 16, 32)]
SMOKE_SHAPES = [(32, 48, 48, 4)]
MODES = ("fwd", "fwd+bwd")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="one tiny shape on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/)")
    p.add_argument("--providers", nargs="*", default=None, help="subset of providers to run")
    return p.parse_args(argv)


# --- providers: each returns (run, trained) where run() -> y ---------------------------------

def _unsloth_function():
    import torch

    class AddmmLoRA(torch.autograd.Function):
        """Unsloth's pattern: y = x·Wᵀ then addmm_(x·Aᵀ, Bᵀ); backward recomputes x·Aᵀ."""

        @staticmethod
        def forward(ctx, x, W, A, B, s):
            x2 = x.reshape(-1, x.shape[-1])
            out = x2 @ W.t()
            out.addmm_(x2 @ A.t(), B.t(), alpha=s)
            ctx.save_for_backward(x2, W, A, B)
            ctx.s, ctx.shape = s, x.shape
            return out.view(*x.shape[:-1], W.shape[0])

        @staticmethod
        def backward(ctx, dy):
            x2, W, A, B = ctx.saved_tensors
            s = ctx.s
            dy2 = dy.reshape(-1, W.shape[0])
            dyB = dy2 @ B
            dA = (dyB.t() @ x2).mul_(s)
            dB = (dy2.t() @ (x2 @ A.t())).mul_(s)
            dx = dy2 @ W
            dx.addmm_(dyB, A, alpha=s)
            return dx.view(ctx.shape), None, dA, dB, None

    return AddmmLoRA


def _providers(tensors, scale) -> Dict[str, Callable[[], Tuple[Callable, list]]]:
    import torch
    import torch.nn.functional as F

    x, W, A, B = tensors["x"], tensors["W"], tensors["A"], tensors["B"]

    def frozen():
        return (lambda: F.linear(x, W)), [x]

    def ours(variant):
        def build():
            from peftkern.ops import functions
            from peftkern.ops.backends import triton as tk

            def run():
                with tk.forward_variant(variant):
                    return functions.adapter(x, W, None, A, B, None, None, scale, backend=tk.BACKEND)
            return run, [x, A, B]
        return build

    def peft_layer():
        from peft import LoraConfig, get_peft_model

        N, K = W.shape
        base = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype))
        with torch.no_grad():
            base[0].weight.copy_(W)
        r = A.shape[0]
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=scale * r, target_modules=["0"], lora_dropout=0.0))
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return (lambda: layer(x)), [x, *params]

    def unsloth():
        fn = _unsloth_function()
        return (lambda: fn.apply(x, W, A, B, scale)), [x, A, B]

    def torch_backend():
        from peftkern.ops import functions
        from peftkern.ops.backends import torch as torch_backend

        return (lambda: functions.adapter(x, W, None, A, B, None, None, scale, backend=torch_backend.BACKEND)), [x, A, B]

    return {"cublas_frozen": frozen, "triton_prior_shrink": ours("prior_shrink"), "triton_in_loop": ours("in_loop"),
            "peft_lora": peft_layer, "unsloth_addmm": unsloth, "torch_backend": torch_backend}


def _tensors(M, K, N, r, dtype, device):
    import torch

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    return {"x": rnd(M, K, grad=True), "W": rnd(N, K, scale=K ** -0.5), "A": rnd(r, K, scale=K ** -0.5, grad=True),
            "B": rnd(N, r, scale=r ** -0.5, grad=True), "dy": rnd(M, N)}


def _timer(smoke: bool):
    if smoke:  # no CUDA events on the CPU; one run is enough to keep the script from rotting
        def once(fn, grad_to_none):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        return once
    import triton.testing

    return lambda fn, grad_to_none: triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def _measure(shapes, dtype, device, providers_wanted, smoke) -> List[dict]:
    import torch

    timer = _timer(smoke)
    rows = []
    for M, K, N, r in shapes:
        t = _tensors(M, K, N, r, dtype, device)
        scale = 2.0
        builders = _providers(t, scale)
        names = [n for n in builders if providers_wanted is None or n in providers_wanted]
        outputs = {}
        for name in names:
            run, trained = builders[name]()
            outputs[name] = run().detach()
            for mode in MODES:
                if mode == "fwd":
                    fn = run
                else:
                    def fn(run=run):
                        run().backward(t["dy"])
                ms = timer(fn, trained)
                flops = 2 * M * N * K * (1 if mode == "fwd" else 2)  # base GEMM(s) only, as the common yardstick
                rows.append({"M": M, "K": K, "N": N, "r": r, "mode": mode, "provider": name, "ms": ms,
                             "base_tflops": flops / (ms * 1e-3) / 1e12})
        ref = outputs.get("torch_backend")
        if ref is not None:  # every adapter provider computes the same y (the frozen GEMM does not)
            for name, y in outputs.items():
                if name != "cublas_frozen":
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"{name} disagrees: {err:.3g}"
    return rows


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write(rows, out: Path, device_name: str, smoke: bool) -> Tuple[Path, Path]:
    import torch
    import triton

    out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    stem = out / f"triton_layer_{slug}_{date}{'_smoke' if smoke else ''}"
    header = (f"device: {device_name}; date: {date} (UTC); commit: {_git_commit()}; torch {torch.__version__}, "
              f"triton {triton.__version__}" + ("; SMOKE RUN on the CPU interpreter: times are meaningless" if smoke
                                                else ""))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        fh.write(f"# {header}\n")
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    frozen = {(r["M"], r["K"], r["N"], r["r"], r["mode"]): r["ms"] for r in rows if r["provider"] == "cublas_frozen"}
    lines = [f"# Triton layer benchmark\n\n{header}\n", "| M | K=N | r | mode | provider | ms | x frozen GEMM |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = frozen.get((r["M"], r["K"], r["N"], r["r"], r["mode"]))
        ratio = f"{r['ms'] / base:.2f}" if base else "-"
        lines.append(f"| {r['M']} | {r['K']} | {r['r']} | {r['mode']} | {r['provider']} | {r['ms']:.4f} | {ratio} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md"), stem.with_suffix(".csv")


def main(argv=None) -> int:
    args = _args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_triton_layer: skipped, needs a CUDA device (use --smoke for the CPU check)")
        return 0
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_triton_layer: --smoke needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
        return 2
    if args.smoke:
        device, dtype, shapes, device_name = "cpu", torch.float32, SMOKE_SHAPES, "cpu-interpreter"
    else:
        device, dtype, shapes, device_name = "cuda", torch.bfloat16, FULL_SHAPES, torch.cuda.get_device_name()
    rows = _measure(shapes, dtype, device, args.providers, args.smoke)
    out = args.out or (ROOT / "benchmarks" / "results")
    md, csv_path = _write(rows, out, device_name, args.smoke)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
