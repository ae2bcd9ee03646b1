"""The GPU training step: peftkern against PEFT and the frozen floor, in one process, bf16.

The configuration of the speed targets (../shared/tools/gpu_step.py is the yardstick they are
measured with; this is the project's own copy of the method, so the check script needs
nothing outside the repository): a Llama of TinyLlama-1.1B's shape (22 layers, hidden 2048,
intermediate 5632, 32 heads, 4 KV heads, vocab 32000), random weights, bf16, batch 8 x 512
tokens; one step is forward, backward and AdamW (AdaLoRA's allocation where it applies).
The floor is the frozen model's forward and backward with activation gradients only.
Every provider gets a fresh model with the same seed; a provider's time is the median of
CUDA-event-timed steps after warm-up, its memory ``torch.cuda.max_memory_allocated`` over
the timed steps. Each provider's line goes to ``<out>/gpu_step.jsonl`` as soon as it is
measured, so a run cut short keeps what it measured; ``--report`` turns the lines into a
Markdown table with ratios to the floor and to PEFT. Each row also has the host time (the
CPU's time to issue the step), which tells a host-bound step from a device-bound one, and
``--profile`` writes one profiled step per named provider (which kernels take the time).

    python benchmarks/bench_gpu_step.py [--out DIR] [--quick] [--providers a,b,...] [--profile a,b]
    python benchmarks/bench_gpu_step.py --report DIR/gpu_step.jsonl

``--quick`` runs a tiny model on the CPU, to check the script (the numbers mean nothing).
peftkern's AdaLoRA regulariser is added to ``outputs.loss`` by the adapter itself (as PEFT
does in its forward), so no provider adds it a second time.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


class Setup:
    def __init__(self, quick: bool):
        self.quick = quick
        self.device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.batch, self.seq = (2, 16) if quick else (8, 512)
        self.steps, self.warmup = (2, 1) if quick else (8, 3)
        self.total_steps = self.warmup + self.steps  # AdaLoRA's schedule spans the measured steps
        self.backend = "auto"  # peftkern's backend for every pk_ provider without its own
        self._quantized = None  # the 4-bit base, built once

    def config(self):
        from transformers import LlamaConfig

        if self.quick:
            return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa")
        return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           attn_implementation="sdpa")

    def base(self, quantized: bool = False):
        """The frozen model; ``quantized``: its decoder Linears as bitsandbytes NF4 layers (double
        quantization, computing in the setup's dtype), QLoRA's base, the same weights quantized."""
        from transformers import LlamaForCausalLM

        if quantized and self._quantized is not None:  # quantizing 1.1B weights took 12-14 s a provider
            return copy.deepcopy(self._quantized).train()
        torch.manual_seed(0)
        with torch.device(self.device):
            model = LlamaForCausalLM(self.config()).to(self.dtype)
        if quantized:
            from common import to_4bit

            to_4bit(model.model.layers, self.dtype, self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        if quantized:  # kept frozen, copied for each provider (its memory is in leftover_gb)
            self._quantized = model
            model = copy.deepcopy(model)
        return model.train()


# A provider builds (model, allocate(step) or None) from the setup.
Provider = Callable[[Setup], tuple]


def ours(method: str, targets: str, compile: bool = False, quantized: bool = False, **options) -> Provider:
    def build(s: Setup):
        import peftkern

        opts = dict(options)
        opts.setdefault("backend", s.backend)
        if "total_step" in opts:
            opts["total_step"] = s.total_steps
        if s.quick and "rank" in opts:
            opts["rank"] = min(opts["rank"], 16)  # the --quick model is 64 wide
        model = peftkern.patch(s.base(quantized), method, targets=TARGETS[targets], **opts)
        return (torch.compile(model) if compile else model), None
    return build


def casts_alone(build: Provider) -> Provider:
    """``build`` with its trained factors cast one by one in every forward and their gradients cast back
    one by one (the hooks that cast them together, peftkern.casts, taken off this model): the side-by-side
    row for the casts' launches on a GPU."""
    def alone(s: Setup):
        model, allocate = build(s)
        casts = model.peftkern.casts
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is casts]:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
        return model, allocate
    return alone


def theirs(kind: str, targets: str, quantized: bool = False, **options) -> Provider:
    def build(s: Setup):
        import peft

        config = {"lora": peft.LoraConfig, "vera": peft.VeraConfig, "adalora": peft.AdaLoraConfig}[kind]
        opts = dict(options)
        if s.quick and "r" in opts:
            opts["r"] = min(opts["r"], 16)  # the --quick model is 64 wide
        opts["vera_dropout" if kind == "vera" else "lora_dropout"] = 0.0
        if kind == "adalora":
            opts["total_step"] = s.total_steps
        model = peft.get_peft_model(s.base(quantized), config(target_modules=TARGETS[targets], **opts))
        allocate = (lambda step: model.base_model.update_and_allocate(step)) if kind == "adalora" else None
        return model, allocate
    return build


PROVIDERS: Dict[str, Optional[Provider]] = {
    "floor": None,
    "pk_lora_qv": ours("lora", "qv", rank=16),
    "peft_lora_qv": theirs("lora", "qv", r=16, lora_alpha=16),
    "pk_lora_all": ours("lora", "all", rank=16),
    "peft_lora_all": theirs("lora", "all", r=16, lora_alpha=16),
    # DoRA, and QLoRA (the decoder's Linears NF4): bitsandbytes' base op + our low-rank term (auto),
    # the fused kernel (triton: W0's 4-bit tiles dequantized in the adapter's GEMM), PEFT on the same base
    # (early in the table: a run cut short by its time limit still measures them)
    "pk_dora_qv": ours("lora", "qv", rank=16, use_dora=True),
    "peft_dora_qv": theirs("lora", "qv", r=16, lora_alpha=16, use_dora=True),
    "pk_dora_all": ours("lora", "all", rank=16, use_dora=True),
    "peft_dora_all": theirs("lora", "all", r=16, lora_alpha=16, use_dora=True),
    # the C++ backend: its adapter, and DoRA without dropout, each one C++ autograd node (no Python in
    # forward or backward); on CUDA only where the extension was built with CUDA (gpu_check.sh tries).
    # Early too: DoRA on the nodes against LoRA on the node is the DoRA target's other half.
    "pk_lora_qv_cpp": ours("lora", "qv", rank=16, backend="cpp"),
    "pk_lora_all_cpp": ours("lora", "all", rank=16, backend="cpp"),
    "pk_dora_qv_cpp": ours("lora", "qv", rank=16, use_dora=True, backend="cpp"),
    "pk_dora_all_cpp": ours("lora", "all", rank=16, use_dora=True, backend="cpp"),
    # the fp32 adapter's trained factors cast per factor, not together (peftkern.casts): what that saves
    "pk_lora_all_casts_alone": casts_alone(ours("lora", "all", rank=16)),
    "pk_dora_all_casts_alone": casts_alone(ours("lora", "all", rank=16, use_dora=True)),
    # QLoRA, ours (auto) and PEFT's on the same 4-bit base, then the Triton rows (after the rows the targets
    # name, since a 200 s call measured 15 providers on 2026-12-04)
    "pk_qlora_qv": ours("lora", "qv", quantized=True, rank=16),
    "peft_qlora_qv": theirs("lora", "qv", quantized=True, r=16, lora_alpha=16),
    "pk_qlora_all": ours("lora", "all", quantized=True, rank=16),
    "peft_qlora_all": theirs("lora", "all", quantized=True, r=16, lora_alpha=16),
    "pk_dora_qv_triton": ours("lora", "qv", rank=16, use_dora=True, backend="triton"),
    "pk_qlora_qv_triton": ours("lora", "qv", quantized=True, rank=16, backend="triton"),
    "pk_qlora_all_triton": ours("lora", "all", quantized=True, rank=16, backend="triton"),
    "pk_pg_pos_qlora_qv": ours("pg_pos", "qv", quantized=True),
    "pk_pg_pos_qv": ours("pg_pos", "qv"),
    "pk_tied_lora_qv": ours("tied_lora", "qv"),
    "pk_vera_qv": ours("vera", "qv", rank=256),
    "peft_vera_qv": theirs("vera", "qv", r=256),
    "pk_adalora_qv": ours("adalora", "qv", rank=8, total_step=0),
    "peft_adalora_qv": theirs("adalora", "qv", init_r=12, target_r=8),
    "pk_hyper_adalora_qv": ours("hyper_adalora", "qv", rank=8, total_step=0),
    "pk_lora_qv_dropout": ours("lora", "qv", rank=16, dropout=0.05),
    "pk_lora_qv_triton": ours("lora", "qv", rank=16, backend="triton"),
    "pk_tied_lora_qv_cpp": ours("tied_lora", "qv", backend="cpp"),
    "pk_vera_qv_cpp": ours("vera", "qv", rank=256, backend="cpp"),
    "pk_lora_qv_compiled": ours("lora", "qv", rank=16, compile=True),
}
# not by default: torch.compile's row, and the fused 4-bit kernel on all linear layers (measured on
# 2026-12-04 at 2,317 ms against bitsandbytes' path's 259: 43 s of a scarce GPU budget per run)
DEFAULT = [name for name in PROVIDERS if name not in ("pk_lora_qv_compiled", "pk_qlora_all_triton")]


def stepper(build: Optional[Provider], s: Setup, **adamw) -> tuple:
    """(step(i), model): one training step of the provider ``build`` (None: the floor, frozen
    forward + backward with gradients for activations only). ``adamw``: AdamW's options."""
    ids = torch.randint(0, s.config().vocab_size, (s.batch, s.seq), device=s.device)
    if build is None:
        model = s.base()

        def step(i):
            embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=ids).loss.backward()
        return step, model
    model, allocate = build(s)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **adamw)

    def step(i):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if allocate is not None:
            allocate(i)
        optimizer.zero_grad(set_to_none=True)
    return step, model


def measure(name: str, build: Optional[Provider], s: Setup) -> Dict[str, object]:
    # The previous provider's model can linger in reference cycles (module hooks): collect it, so
    # that this provider's peak is its own. leftover_gb says what was still held (should be ~0).
    gc.collect()
    leftover = 0.0
    if s.device == "cuda":
        torch.cuda.empty_cache()
        leftover = torch.cuda.memory_allocated() / 2 ** 30
    step, model = stepper(build, s)
    started = time.perf_counter()
    for i in range(s.warmup):
        step(i)
    warm_s = time.perf_counter() - started
    times, host = [], []
    if s.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(s.steps):
        if s.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t = time.perf_counter()
            step(s.warmup + i)
            host.append(1e3 * (time.perf_counter() - t))
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step(s.warmup + i)
            times.append(1e3 * (time.perf_counter() - t))
            host.append(times[-1])
    # host_ms: the time the CPU took to issue the step (until step() returned, no sync). Close to
    # ms_median means the step is host-bound (the GPU waits for launches); well below, device-bound.
    row = {"provider": name, "ms_median": statistics.median(times), "ms_min": min(times), "ms_all": times,
           "host_ms_median": statistics.median(host),
           "peak_gb": torch.cuda.max_memory_allocated() / 2 ** 30 - leftover if s.device == "cuda" else None,
           "leftover_gb": round(leftover, 3),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "warmup_s": round(warm_s, 1)}
    if name.startswith("pk_"):
        import peftkern

        inner = getattr(model, "_orig_mod", model)
        row["paths"] = sorted({f"{r['backend']}: {r['path']}" for r in peftkern.explain(inner).rows})
    return row


def profile(name: str, build: Optional[Provider], s: Setup, out: Path) -> Path:
    """One step of ``name`` under torch.profiler, after two warm-up steps: the ops and kernels
    sorted by their own device time (CPU time with --quick), to ``<out>/profile_<name>.txt``.
    It says where a provider's time above the floor goes: which kernels, and how much."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled

    step, _ = stepper(build, s)
    for i in range(2):
        step(i)
    cuda = s.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profiled(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        step(2)
        if cuda:
            torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - t)
    events = prof.key_averages()
    # the kernels' own time against the step's wall time: far below it, the device sat idle
    # waiting for the host (launch-bound); near it, the kernels themselves are the cost
    busy_ms = sum(e.self_device_time_total for e in events) / 1e3
    table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                         row_limit=40, max_name_column_width=90)
    path = out / f"profile_{name}.txt"
    path.write_text(f"# one step of {name} ({header(s)['device']}, commit {commit()})\n"
                    f"# wall {wall_ms:.1f} ms (profiler overhead included), device busy {busy_ms:.1f} ms\n{table}\n")
    return path


def header(s: Setup) -> Dict[str, object]:
    info = {"device": torch.cuda.get_device_name() if s.device == "cuda" else "cpu (--quick: not a measurement)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
            "torch": torch.__version__, "dtype": str(s.dtype), "batch": [s.batch, s.seq], "steps": s.steps,
            "warmup": s.warmup}
    for name in ("transformers", "peft", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # a provider needing it will report its own error
            pass
    return info


def commit() -> str:
    if os.environ.get("PEFTKERN_COMMIT"):
        return os.environ["PEFTKERN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def report(path: Path) -> str:
    """The Markdown table of a gpu_step.jsonl: ms/step, × floor, × PEFT's same method, peak GB."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = next(line for line in lines if "device" in line)
    rows = {r["provider"]: r for r in lines if "provider" in r}
    floor = rows.get("floor", {}).get("ms_median")
    out = [f"# GPU training step ({head['device']})", "",
           f"date {head['date']}, commit {head['commit']}, torch {head.get('torch')}, transformers "
           f"{head.get('transformers')}, peft {head.get('peft')}, triton {head.get('triton')}; {head['dtype']}, "
           f"batch {head['batch'][0]}x{head['batch'][1]}, median of {head['steps']} steps after {head['warmup']} "
           "warm-up (benchmarks/bench_gpu_step.py)", "",
           "host ms: the CPU's time to issue the step, no sync (near ms/step: host-bound)", "",
           "| provider | ms/step | x floor | x PEFT | host ms | peak GB | paths |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if "error" in r:
            out.append(f"| {name} | error: {r['error'][:80]} | | | | | |")
            continue
        peer = rows.get(name.replace("pk_", "peft_", 1).replace("_triton", "").replace("_compiled", "")
                        .replace("_dropout", ""))
        ratio = f"{r['ms_median'] / peer['ms_median']:.2f}" if peer and "ms_median" in peer and peer is not r else ""
        x_floor = f"{r['ms_median'] / floor:.2f}" if floor else ""
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else ""
        paths = "; ".join(r.get("paths", [])).replace("|", "\\|")
        host = f"{r['host_ms_median']:.1f}" if r.get("host_ms_median") is not None else ""
        out.append(f"| {name} | {r['ms_median']:.1f} | {x_floor} | {ratio} | {host} | {peak} | {paths} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    p.add_argument("--quick", action="store_true", help="a tiny model on the CPU, to check the script")
    p.add_argument("--providers", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(PROVIDERS)}")
    p.add_argument("--report", help="print the Markdown table of a gpu_step.jsonl and exit")
    p.add_argument("--profile", default="", help="comma-separated providers to profile one step of, after the "
                   "measurements (profile_<name>.txt in --out); none by default")
    args = p.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return 0
    names = [n for n in args.providers.split(",") if n]
    profiled = [n for n in args.profile.split(",") if n]
    unknown = [n for n in names + profiled if n not in PROVIDERS]
    if unknown:
        p.error(f"unknown provider(s) {unknown}; valid: {', '.join(PROVIDERS)}")
    s = Setup(args.quick)
    if s.device != "cuda" and not args.quick:
        print("bench_gpu_step: no CUDA device; use --quick to check the script on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_step.jsonl"
    with open(path, "a") as f:
        print(json.dumps(header(s)), file=f, flush=True)
        for name in names:
            t0 = time.time()
            try:
                row = measure(name, PROVIDERS[name], s)
            except Exception as exc:  # one provider's failure must not lose the others' results
                row = {"provider": name, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-1500:]}
            row["wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(row), file=f, flush=True)
            print(name, {k: v for k, v in row.items() if k not in ("ms_all", "traceback")}, flush=True)
    (out / "gpu_step.md").write_text(report(path))
    print(report(path))
    for name in profiled:  # after the table, so a profile cut off by a time limit loses no measurement
        try:
            print("profile:", profile(name, PROVIDERS[name], s, out), flush=True)
        except Exception as exc:
            print(f"profile of {name} failed: {type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
