"""CPU training-step benchmark: peftkern's adapters against PEFT's and against the floor.

One Llama-architecture model with SmolLM2-135M's shape (hidden 576, intermediate 1536,
30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings), randomly initialised from
a config, fp32, and one batch (4×128 tokens by default). Every provider runs a full
training step on it: forward, backward, optimizer step (and AdaLoRA's allocation).

    floor          the model with every weight frozen and the input embeddings requiring
                   grad: forward + backward through every layer, no adapter, no optimizer
    lora_cpp       peftkern lora, r=8 on q_proj and v_proj, backend="cpp"
    lora_torch     the same with backend="torch" (the hand-written ATen reference)
    lora_peft      PEFT LoRA, same r, alpha and targets
    vera_cpp       peftkern vera, backend="cpp"        vera_peft      PEFT VeRA
    adalora_cpp    peftkern adalora (when registered)  adalora_peft   PEFT AdaLoRA
                   (allocation every step: tinit=0, deltaT=1)
    dora           peftkern lora with use_dora=True (auto)  dora_peft      PEFT's DoRA
    dora_scaled    ours with DoRA's column scale on every call, never folded into W0 (the
                   route many-token calls took before the fold; peftkern.ops.functions.dora_folds)

All providers share the same frozen base weights (one copy in memory) and are timed
interleaved, in a rotating order, over several repetitions; the tables report medians,
ratios to the floor, and our overhead divided by PEFT's. ``--memory`` adds the peak RSS
of a fresh subprocess per provider (model build + warm-up + timed steps).

    python benchmarks/bench_cpu_step.py            # full size, results in benchmarks/results/
    python benchmarks/bench_cpu_step.py --quick    # 2 layers, small vocab and batch: < 30 s
    python benchmarks/bench_cpu_step.py --memory   # also the peak RSS per provider
    python benchmarks/bench_cpu_step.py --clock wall --threads 0   # elapsed time, torch's threads

The default is one torch thread timed by the process CPU-time clock: on a machine that
other jobs share, elapsed time mostly measures them (and OpenMP threads that wait for a
descheduled sibling), while the CPU time of one thread is what the step itself costs.
On a quiet machine ``--clock wall --threads 0`` gives the elapsed time with torch's
threads. The results record the clock, the thread count and the command line.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import peftkern  # noqa: E402
import peftkern.quant  # noqa: E402

TARGET_SETS = {"qv": ["q_proj", "v_proj"],
               "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TARGETS = list(TARGET_SETS["qv"])  # --targets sets it (module-level: the providers read it when they build)


# --- the model and the batch -----------------------------------------------------------------


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       tie_word_embeddings=True, max_position_embeddings=max(2048, args.seq))


def build_base(args) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(args)).float()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def sharing_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree whose parameters *are* the base's (one copy of the weights
    for every provider); buffers and modules are copied, so patching one copy leaves the
    others alone. Safe because every provider keeps the base weights frozen."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


def batch(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)


# --- providers ----------------------------------------------------------------------------------


@dataclass
class Runner:
    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    after_step: Optional[Callable[[int], None]] = None  # PEFT AdaLoRA's update_and_allocate
    track_paths: bool = False
    paths: Dict[str, int] = field(default_factory=dict)
    steps: int = 0
    fold_rows_per_feature: Optional[float] = None  # our DoRA's route threshold for this runner's steps

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fold_rows_per_feature is None:
            return train_step(self, {"input_ids": ids, "labels": ids})
        from peftkern.ops import functions

        default, functions.FOLD_MIN_ROWS_PER_FEATURE = functions.FOLD_MIN_ROWS_PER_FEATURE, self.fold_rows_per_feature
        try:
            return train_step(self, {"input_ids": ids, "labels": ids})
        finally:
            functions.FOLD_MIN_ROWS_PER_FEATURE = default

    def collect_paths(self) -> None:
        if not self.track_paths:
            return
        from peftkern.ops.backends import cpp as cpp_kernels

        for name, n in cpp_kernels.path_counts().items():
            self.paths[name] = self.paths.get(name, 0) + n
        cpp_kernels.reset_path_counts()


def train_step(runner, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward, backward, optimizer step, then ``after_step`` (PEFT AdaLoRA's allocation; ours runs
    in the optimizer-step hook), then zero_grad: the step every provider is timed on."""
    loss = runner.model(**batch).loss
    loss.backward()
    runner.steps += 1
    if runner.optimizer is not None:
        runner.optimizer.step()
    if runner.after_step is not None:
        runner.after_step(runner.steps)
    if runner.optimizer is not None:
        runner.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _adamw(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4)


def make_floor(base, args) -> Runner:
    model = sharing_copy(base)
    # The embedding output becomes a leaf that requires grad, so backward runs through every
    # layer down to the first, as it does for an adapter in layer 0, with no weight gradient.
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return Runner(model, None)


def make_ours(method: str, backend: str, fold_rows_per_feature: Optional[float] = None, **extra) -> Callable:
    def make(base, args) -> Runner:
        model = sharing_copy(base)
        if method == "lora":
            peftkern.patch(model, "lora", rank=args.rank, targets=TARGETS, alpha=args.alpha, backend=backend, **extra)
        elif method == "pg_pos":
            peftkern.patch(model, "pg_pos", rank=args.rank, targets=TARGETS, backend=backend)
        elif method == "vera":
            peftkern.patch(model, "vera", rank=args.vera_rank, targets=TARGETS, backend=backend)
        else:
            peftkern.patch(model, "adalora", rank=args.rank, targets=TARGETS, alpha=args.alpha, backend=backend,
                           **ADALORA_SCHEDULE)
        return Runner(model, _adamw(model), track_paths=backend == "cpp", fold_rows_per_feature=fold_rows_per_feature)

    return make


# PEFT's AdaLoRA needs total_step; allocation (importance update + masking) every step.
ADALORA_SCHEDULE = dict(tinit=0, tfinal=0, deltaT=1, total_step=100_000)


def make_peft(method: str, **extra) -> Callable:
    def make(base, args) -> Runner:
        import peft

        model = sharing_copy(base)
        if method == "lora":
            cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0,
                                  bias="none", task_type="CAUSAL_LM", **extra)
        elif method == "vera":
            cfg = peft.VeraConfig(r=args.vera_rank, target_modules=TARGETS, vera_dropout=0.0, d_initial=0.1,
                                  projection_prng_key=0, task_type="CAUSAL_LM")
        else:
            cfg = peft.AdaLoraConfig(target_r=args.rank, init_r=round(1.5 * args.rank), lora_alpha=args.alpha,
                                     target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     beta1=0.85, beta2=0.85, orth_reg_weight=0.5, **ADALORA_SCHEDULE)
        model = peft.get_peft_model(model, cfg)
        after = None
        if method == "adalora":
            after = model.base_model.update_and_allocate
        return Runner(model, _adamw(model), after_step=after)

    return make


@dataclass(frozen=True)
class Provider:
    name: str
    method: str  # what it is compared with: ratios of overheads pair ours and PEFT's by method
    impl: str  # "floor", "peftkern-cpp", "peftkern-torch", "peft"
    make: Callable
    base: str = "fp32"  # "4bit": the same weights, the decoder's Linears bitsandbytes NF4 (QLoRA)


PROVIDERS = [
    Provider("floor", "-", "floor", make_floor),
    Provider("lora_cpp", "lora", "peftkern-cpp", make_ours("lora", "cpp")),
    Provider("lora_torch", "lora", "peftkern-torch", make_ours("lora", "torch")),
    Provider("lora_peft", "lora", "peft", make_peft("lora")),
    Provider("vera_cpp", "vera", "peftkern-cpp", make_ours("vera", "cpp")),
    Provider("vera_peft", "vera", "peft", make_peft("vera")),
    Provider("adalora_cpp", "adalora", "peftkern-cpp", make_ours("adalora", "cpp")),
    Provider("adalora_peft", "adalora", "peft", make_peft("adalora")),
    Provider("dora", "dora", "peftkern", make_ours("lora", "auto", use_dora=True)),
    Provider("dora_peft", "dora", "peft", make_peft("lora", use_dora=True)),
    # our DoRA with the column scale on every call (never folded into W0): the fold's side by side
    Provider("dora_scaled", "dora", "peftkern", make_ours("lora", "auto", float("inf"), use_dora=True)),
    # QLoRA: the base's decoder Linears NF4 (double quantization, fp32 compute), its own floor
    Provider("floor_4bit", "-", "floor", make_floor, "4bit"),
    Provider("qlora", "lora", "peftkern", make_ours("lora", "auto"), "4bit"),
    Provider("qlora_peft", "lora", "peft", make_peft("lora"), "4bit"),
    Provider("qlora_dora", "dora", "peftkern", make_ours("lora", "auto", use_dora=True), "4bit"),
    Provider("qlora_dora_peft", "dora", "peft", make_peft("lora", use_dora=True), "4bit"),
    Provider("qlora_pg_pos", "pg_pos", "peftkern", make_ours("pg_pos", "auto"), "4bit"),
]
BY_NAME = {p.name: p for p in PROVIDERS}


def available(names: List[str]) -> List[Provider]:
    """The providers asked for; adalora only if peftkern registers it when this runs."""
    has_adalora = "adalora" in peftkern.methods()
    out = []
    for n in names:
        if n not in BY_NAME:
            raise SystemExit(f"unknown provider {n!r}; valid: {', '.join(BY_NAME)}")
        if BY_NAME[n].method == "adalora" and not has_adalora:
            print(f"skipping {n}: 'adalora' is not in peftkern.methods()", file=sys.stderr)
            continue
        out.append(BY_NAME[n])
    return out


# --- measurement -------------------------------------------------------------------------------


CLOCKS = {
    "wall": time.perf_counter,
    # CPU time of this process: on a shared machine it counts what the step itself costs, not
    # the time other processes held the cores. Use it with --threads 1 (with more threads
    # it also counts OpenMP's spin-waiting).
    "cpu": time.process_time,
}


def time_interleaved(runners: Dict[str, Runner], ids: torch.Tensor, reps: int, warmup: int,
                     clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n].step(ids)
            runners[n].collect_paths()
    for r in runners.values():
        r.paths.clear()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no provider always runs first
        for n in order:
            t0 = clock()
            runners[n].step(ids)
            times[n].append(clock() - t0)
            runners[n].collect_paths()
    return times


def child_memory(args, name: str) -> Dict[str, float]:
    """Peak RSS of a fresh interpreter that builds the model and runs one provider."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + args.passthrough
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quantized_base(base: torch.nn.Module) -> torch.nn.Module:
    """The base with its decoder Linears as bitsandbytes NF4 layers (a copy; the embeddings stay fp32)."""
    from common import to_4bit

    model = copy.deepcopy(base)
    to_4bit(model.model.layers, torch.float32)
    peftkern.quant.keep_trainable(model)  # PEFT's too: bitsandbytes' CPU repacking has no backward
    return model.train()


def run_child(args) -> None:
    base = build_base(args)
    if BY_NAME[args.child].base == "4bit":  # the fp32 weights go: the model in memory is the 4-bit one
        base = quantized_base(base)
        gc.collect()
    ids = batch(args)
    runner = BY_NAME[args.child].make(base, args)
    gc.collect()
    rss_built = _status_mb("VmRSS")
    # Random initialisation has its own peak; reset the high-water mark so that the peak
    # reported is the training steps' (Linux >= 4.0: writing 5 to clear_refs resets VmHWM).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(args.warmup + min(args.reps, 2)):  # the peak is reached within the first steps
        runner.step(ids)
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "rss_after_build_mb": rss_built}))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# --- report ------------------------------------------------------------------------------------


def machine() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain"):
        commit += " (working tree has uncommitted changes)"
    import peft
    import transformers

    try:
        from peftkern.ops.backends import cpp as cpp_kernels
        ext = cpp_kernels.build_info()
    except ImportError as exc:
        ext = f"unavailable: {exc}"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "peftkern._C": ext, "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def summarise(providers: List[Provider], times: Dict[str, List[float]], runners: Dict[str, Runner],
              memory: Dict[str, Dict[str, float]]) -> List[Dict[str, object]]:
    med = {n: statistics.median(t) for n, t in times.items()}
    floors = {p.base: med[p.name] for p in providers if p.impl == "floor"}
    peft_overhead = {(p.method, p.base): med[p.name] - floors[p.base] for p in providers
                     if p.impl == "peft" and p.base in floors}
    rows = []
    for p in providers:
        m = med[p.name]
        floor = floors.get(p.base)
        q1, q3 = (statistics.quantiles(times[p.name], n=4)[0::2] if len(times[p.name]) >= 2 else (m, m))
        row = {"provider": p.name, "method": p.method, "impl": p.impl, "base": p.base, "median_ms": round(m * 1e3, 1),
               "iqr_ms": f"{q1 * 1e3:.1f}-{q3 * 1e3:.1f}", "reps": len(times[p.name])}
        if floor:
            row["ratio_to_floor"] = round(m / floor, 4)
            row["overhead_ms"] = round((m - floor) * 1e3, 1)
            po = peft_overhead.get((p.method, p.base))
            row["overhead_vs_peft"] = round((m - floor) / po, 3) if po and p.impl != "peft" and po > 0 else ""
        if p.name in memory:
            row["peak_rss_mb"] = round(memory[p.name]["peak_rss_mb"], 1)
            row["peak_minus_model_mb"] = round(memory[p.name]["peak_rss_mb"] - memory[p.name]["rss_after_build_mb"], 1)
        paths = runners[p.name].paths
        row["cpp_paths"] = " ".join(f"{k}={v}" for k, v in sorted(paths.items()))
        rows.append(row)
    return rows


def write_results(args, rows, info) -> str:
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "bench_cpu_step" + ("_quick" if args.quick else "")
                        + ("_cpuclock" if args.clock == "cpu" else "") + (f"_{args.tag}" if args.tag else ""))
    cols = ["provider", "method", "impl", "base", "median_ms", "iqr_ms", "reps", "ratio_to_floor", "overhead_ms",
            "overhead_vs_peft", "peak_rss_mb", "peak_minus_model_mb", "cpp_paths"]
    cols = [c for c in cols if any(c in r for r in rows)]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + list(info))
        w.writeheader()
        for r in rows:
            w.writerow({**{c: r.get(c, "") for c in cols}, **info})
    shape = (f"Llama, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
             f"{args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}, tied embeddings, fp32; "
             f"batch {args.batch}x{args.seq} tokens; r={args.rank} (VeRA r={args.vera_rank}), alpha={args.alpha}, "
             f"targets {', '.join(TARGETS)}")
    lines = ["# CPU training step: peftkern vs PEFT vs the floor", "",
             "Provisional: measured on a shared machine; rerun on a quiet one before quoting.", "",
             f"- workload: {shape}",
             f"- timing: {args.reps} interleaved repetitions (rotating order) after {args.warmup} warm-up step(s) "
             "per provider; medians; one step = forward + backward + optimizer step (+ allocation for AdaLoRA); "
             f"clock: {args.clock} ({'elapsed time' if args.clock == 'wall' else 'process CPU time'})",
             "- floor: all weights frozen, input embeddings require grad (backward through every layer), "
             "no adapter, no optimizer; floor_4bit the same on the 4-bit base, which the 4-bit rows are "
             "compared with",
             "- 4bit: the decoder's Linears as bitsandbytes NF4 layers (double quantization, fp32 compute), "
             "the same weights quantized; PEFT's rows on the same 4-bit model"]
    lines.append("- command: `" + " ".join(["python", "benchmarks/bench_cpu_step.py"] + args.argv) + "`")
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if any("peak_rss_mb" in r for r in rows):
        lines.append("- memory: a fresh subprocess per provider builds the model and the adapter, resets its RSS "
                     "high-water mark, then runs the warm-up and up to 2 steps; peak_rss_mb is that high-water mark "
                     "(VmHWM), peak_minus_model_mb subtracts the RSS right before the steps")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


# --- command line ------------------------------------------------------------------------------


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, vocab 8192, batch 2x64, 3 reps: under 30 s")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", choices=sorted(TARGET_SETS), default="qv", help="q_proj, v_proj (default) or every "
                    "Linear of the decoder")
    ap.add_argument("--vera-rank", type=int, default=128, help="VeRA's r (at most 192: v_proj's width with GQA)")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice; default 1)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="cpu: process CPU time (default; shared machines, with --threads 1); "
                         "wall: elapsed time (quiet machines)")
    ap.add_argument("--providers", default=",".join(p.name for p in PROVIDERS))
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS, one fresh subprocess per provider")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="", help="appended to the results' file names (one file per configuration)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = dict(layers=2, vocab=8192, batch=2, seq=64, reps=3)
    full = dict(layers=30, vocab=49152, batch=4, seq=128, reps=7)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.clock == "cpu" and args.threads != 1:
        print("warning: --clock cpu with more than one thread also counts OpenMP's spin-waiting", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    TARGETS[:] = TARGET_SETS[args.targets]
    # What a memory subprocess needs to rebuild the same model and batch.
    args.passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                        ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq", "rank", "targets",
                         "vera_rank", "alpha", "reps", "warmup", "seed", "threads")]
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.child:
        run_child(args)
        return
    t_start = time.perf_counter()
    providers = available([n for n in args.providers.split(",") if n])
    bases = {"fp32": build_base(args)}
    if any(p.base == "4bit" for p in providers):
        bases["4bit"] = quantized_base(bases["fp32"])
    ids = batch(args)
    runners = {p.name: p.make(bases[p.base], args) for p in providers}
    times = time_interleaved(runners, ids, args.reps, args.warmup, CLOCKS[args.clock])
    memory = {p.name: child_memory(args, p.name) for p in providers} if args.memory else {}
    info = machine()
    rows = summarise(providers, times, runners, memory)
    stem = write_results(args, rows, info)
    print(open(stem + ".md").read())
    print(f"wrote {stem}.md and {stem}.csv in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
