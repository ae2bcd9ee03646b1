"""What a training step asks of the device and of the host, measured without a GPU.

The floor's counts are not a lower bound for the others: it back-propagates into the
embeddings, through layer 0, which an adapter step whose first trained tensor is inside layer
0 does not. Compare a provider with PEFT's same method (the ``x_peft`` columns).

The GPU step (bench_gpu_step.py) is the speed target, and an H200 is not always at hand. Two of
the costs the issue names as "fixed costs, not arithmetic" can be measured on any machine, for
the same providers (bench_gpu_step.PROVIDERS) and the same step (forward, backward, AdamW with
foreach, CUDA's default; AdaLoRA's allocation where the provider has one):

``launches``  ATen compute ops per step, counted by a TorchDispatchMode on the ``meta`` device at
              the GPU step's exact shape (TinyLlama-1.1B, bf16, 8 x 512 tokens). On CUDA each is
              one kernel launch or a few (views, ``empty`` and other aliases are not counted:
              they launch nothing). A step that completes on meta reads no device value on the
              host (``.item()`` raises there), so it has no host-device synchronisation on CUDA
              either; a provider that does read one is reported with that error.
``host_ms``   CPU wall time of the same step, with peftkern's torch backend (auto's choice on
              CUDA), on a model with the same 22 layers and targets but width 64 and 1 x 8
              tokens, so arithmetic is negligible and what is left is Python, autograd and
              dispatch: the host time a GPU step cannot go below when the GPU waits on the
              host. Providers are timed interleaved, one torch thread, medians.

The ``_cpp`` providers run the C++ backend instead, whose adapter op is one C++ autograd
node (csrc/autograd/adapter_node.cpp): on meta it takes its addmm path (the GEMM sequence a
CUDA build would run), in the host timing its CPU float32 paths (fused or merged, per call).

Neither is a GPU figure. A step is at least max(device time, host time); these bound the
second and count the launches behind the first.

    python benchmarks/bench_launches.py                 # every provider, writes results/launches.{md,csv}
    python benchmarks/bench_launches.py --quick         # 2 layers, a few providers (CI smoke)
"""
from __future__ import annotations

import argparse
import collections
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_gpu_step as gpu  # noqa: E402  (the providers and the configuration of the GPU step)

# launch nothing on any device: allocation without a fill, and scalar reads (of CPU tensors here,
# e.g. AdamW's step counters: a meta tensor's read raises)
NOT_LAUNCHES = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
                "_local_scalar_dense", "_unsafe_view", "_reshape_alias", "alias"}
# the providers whose counts the table compares (bench_gpu_step's, minus the ones that only
# differ on a GPU: Triton, compiled)
DEFAULT = ["floor", "peft_lora_qv", "pk_lora_qv", "pk_lora_qv_dropout", "peft_lora_all", "pk_lora_all",
           "pk_pg_pos_qv", "pk_tied_lora_qv", "peft_vera_qv", "pk_vera_qv", "peft_adalora_qv", "pk_adalora_qv",
           "pk_hyper_adalora_qv", "pk_lora_qv_cpp", "pk_lora_all_cpp", "pk_tied_lora_qv_cpp", "pk_vera_qv_cpp"]


class CountLaunches(TorchDispatchMode):
    """Counts the ATen ops that would launch work on a device (module docstring)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in NOT_LAUNCHES:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class Shape(gpu.Setup):
    """bench_gpu_step's setup on another device: ``meta`` at the GPU step's shape (launch counts),
    or the CPU at width 64 with the same depth (host time)."""

    def __init__(self, device: str, layers: int, tiny: bool):
        super().__init__(quick=False)
        self.device, self.layers, self.tiny = device, layers, tiny
        self.backend = "torch"  # what auto runs on CUDA (on the CPU it would be the C++ backend)
        self.dtype = torch.bfloat16 if device == "meta" else torch.float32
        if tiny:
            self.batch, self.seq = 1, 8

    def config(self):
        from transformers import LlamaConfig

        if self.tiny:
            return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=self.layers,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                               attn_implementation="sdpa")
        config = super().config()
        config.num_hidden_layers = self.layers
        return config

    @property
    def quick(self):  # bench_gpu_step caps ranks at 16 on its --quick model; the tiny model is 64 wide too
        return self.tiny

    @quick.setter
    def quick(self, value):
        pass


def stepper(name: str, s: Shape):
    """(step(i), model) for provider ``name``: bench_gpu_step's step with AdamW(foreach=True)."""
    return gpu.stepper(gpu.PROVIDERS[name], s, foreach=True)


def count(name: str, layers: int) -> Dict[str, object]:
    """Launches of one step at the GPU step's shape, on meta (the second step: the first creates
    AdamW's state). A step that reads tensor values on the host cannot run on meta; it is counted
    on the tiny CPU model (same layers and targets: the op count does not depend on the width)
    and marked, because on CUDA each such read is a host-device synchronisation."""
    where = "meta"
    step, model = stepper(name, Shape("meta", layers, tiny=False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # at the real shape
    try:
        step(0)
        with CountLaunches() as c:
            step(1)
    except RuntimeError as exc:
        if "meta" not in str(exc):
            raise
        where = "cpu (reads values on the host: a sync per read on CUDA)"
        step, _ = stepper(name, Shape("cpu", layers, tiny=True))
        step(0)
        with CountLaunches() as c:
            step(1)
    return {"launches": sum(c.ops.values()), "counted_on": where, "top_ops": dict(c.ops.most_common(6)),
            "trainable": trainable}


def host_times(names: List[str], layers: int, reps: int, steps: int) -> Dict[str, List[float]]:
    """ms per step of each provider on the tiny CPU model, interleaved in a rotating order."""
    torch.set_num_threads(1)
    s = Shape("cpu", layers, tiny=True)
    steppers = {}
    for name in names:
        step, _ = stepper(name, s)
        for i in range(3):
            step(i)
        steppers[name] = step
    return interleaved(steppers, reps, steps)


def interleaved(steppers: Dict[Any, Callable[[int], Any]], reps: int, steps: int) -> Dict[Any, List[float]]:
    """ms per step of each warmed-up stepper: ``reps`` rounds of ``steps`` steps each, every round
    in an order rotated by one, so that a drift of the machine falls on every key alike."""
    keys = list(steppers)
    times: Dict[Any, List[float]] = {k: [] for k in keys}
    for rep in range(reps):
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            t = time.perf_counter()
            for i in range(steps):
                steppers[key](i)
            times[key].append(1e3 * (time.perf_counter() - t) / steps)
    return times


def peer(name: str) -> Optional[str]:
    """PEFT's provider for the same method and targets, if any."""
    base = name.replace("_dropout", "").replace("_cpp", "")
    return base.replace("pk_", "peft_", 1) if name.startswith("pk_") else None


def table(rows: Dict[str, Dict[str, object]]) -> List[Dict[str, object]]:
    floor = rows.get("floor", {})
    out = []
    for name, r in rows.items():
        if "error" in r:
            out.append({"provider": name, "error": r["error"]})
            continue
        p = rows.get(peer(name) or "", {})

        def ratio(key, other):
            return round(r[key] / other[key], 2) if key in r and key in other else ""
        out.append({"provider": name, "launches": r["launches"], "launches_x_peft": ratio("launches", p),
                    "host_ms": round(r["host_ms"], 2) if "host_ms" in r else "",
                    "host_x_floor": ratio("host_ms", floor), "host_x_peft": ratio("host_ms", p),
                    "trainable": r["trainable"], "counted_on": r["counted_on"]})
    return out


def write(out_rows: List[Dict[str, object]], meta: Dict[str, object], out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = ["provider", "launches", "launches_x_peft", "host_ms", "host_x_floor", "host_x_peft", "trainable",
            "counted_on"]
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(out_rows)
    lines = ["# Launches and host time per training step (no GPU involved)", "",
             *[f"- {k}: {v}" for k, v in meta.items()], "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in out_rows:
        lines.append("| " + (f"{r['provider']} | error: {r['error'][:100]}" if "error" in r
                             else " | ".join(str(r.get(c, "")) for c in cols)) + " |")
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, 4 providers, few repetitions (a smoke run)")
    p.add_argument("--providers", default=None, help=f"comma-separated, from {', '.join(gpu.PROVIDERS)}")
    p.add_argument("--reps", type=int, default=9, help="interleaved host-time repetitions")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    names = (args.providers.split(",") if args.providers else
             ["floor", "peft_lora_qv", "pk_lora_qv", "pk_pg_pos_qv"] if args.quick else DEFAULT)
    unknown = [n for n in names if n not in gpu.PROVIDERS]
    if unknown:
        p.error(f"unknown provider(s) {unknown}; valid: {', '.join(gpu.PROVIDERS)}")
    layers = 2 if args.quick else 22
    reps, steps = (2, 1) if args.quick else (args.reps, 3)
    rows: Dict[str, Dict[str, object]] = {}
    for name in names:
        try:
            rows[name] = count(name, layers)
        except Exception as exc:  # a provider that cannot run on meta is reported, not fatal
            rows[name] = {"error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}
        print(name, {k: v for k, v in rows[name].items() if k != "top_ops"}, flush=True)
    timed = [n for n in names if "error" not in rows[n]]
    for name, ts in host_times(timed, layers, reps, steps).items():
        rows[name]["host_ms"] = statistics.median(ts)
    commit = gpu.commit()
    meta = {"what": "launches: ATen compute ops of one training step on the meta device at the GPU step's shape "
                    f"(Llama {layers} layers, hidden 2048, bf16, batch 8x512); host_ms: CPU wall time of that step "
                    f"with width 64 and 1x8 tokens ({layers} layers, fp32, one thread, median of {reps} interleaved "
                    f"repetitions of {steps} steps). Not GPU figures.",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__}
    for lib in ("transformers", "peft"):
        meta[lib] = __import__(lib).__version__
    out_rows = table(rows)
    path = write(out_rows, meta, Path(args.out), "launches_quick" if args.quick else "launches")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
