"""Shared benchmark pieces: model shapes from configs, the provider registry, the equivalence
checks that keep every comparison honest, peak-memory subprocesses and results files.

Used by the pytest-benchmark suites (``benchmarks/test_*.py``), ``memory_profile.py`` and
``targets.py``. Timing, the machine description and the RSS reader come from
``bench_cpu_step`` (owned elsewhere for now); they belong here in the long run.

Environment (all optional):
    PEFTKERN_BENCH_MODEL    one of MODELS (default "tiny": the CI smoke size)
    PEFTKERN_BENCH_LAYERS   override the number of transformer blocks
    PEFTKERN_BENCH_BATCH    override the batch size; PEFTKERN_BENCH_SEQ the sequence length
    PEFTKERN_BENCH_ROUNDS   timed rounds per suite benchmark (default 3)
    PEFTKERN_BENCH_THREADS  torch threads for the suites (conftest.py)
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
for _p in (REPO, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_cpu_step import (  # noqa: E402,F401
    ADALORA_SCHEDULE,
    CLOCKS,
    _status_mb,
    machine,
    sharing_copy,
    time_interleaved,
    train_step,
)

import peftkern  # noqa: E402

# --- model shapes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of CONFIGS
    config: Dict[str, Any]
    task: str  # "lm" (labels = input ids) | "cls" (sequence classification, 2 labels)
    targets: Sequence[str]
    batch: int
    seq: int
    note: str = ""

    @property
    def vocab(self) -> int:
        return self.config["vocab_size"]

    def with_(self, layers: Optional[int] = None, batch: Optional[int] = None, seq: Optional[int] = None) -> "ModelSpec":
        config = dict(self.config)
        if layers is not None:
            config[LAYER_KEY[self.family]] = layers
        return dataclasses.replace(self, config=config, batch=batch or self.batch, seq=seq or self.seq)

    @property
    def layers(self) -> int:
        return self.config[LAYER_KEY[self.family]]

    def describe(self) -> str:
        c = self.config
        return (f"{self.name} shape ({self.family}: hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
                f"{self.layers} layers, {c['num_attention_heads']} heads"
                + (f" / {c['num_key_value_heads']} KV heads" if "num_key_value_heads" in c else "")
                + f", vocab {c['vocab_size']}), random weights; batch {self.batch}x{self.seq} tokens; "
                f"targets {', '.join(self.targets)}" + (f"; {self.note}" if self.note else ""))


LAYER_KEY = {"llama": "num_hidden_layers", "bert": "num_hidden_layers", "roberta": "num_hidden_layers"}
_LLAMA_QV = ("q_proj", "v_proj")
_BERT_QV = ("query", "value")
_BERT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)

MODELS: Dict[str, ModelSpec] = {m.name: m for m in [
    ModelSpec("tiny", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
              "lm", _LLAMA_QV, batch=2, seq=16, note="CI smoke size"),
    ModelSpec("smollm2", "llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                       tie_word_embeddings=True), "lm", _LLAMA_QV, batch=4, seq=128,
              note="SmolLM2-135M"),
    ModelSpec("tinyllama", "llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                         tie_word_embeddings=False), "lm", _LLAMA_QV, batch=4, seq=128,
              note="TinyLlama-1.1B"),
    ModelSpec("tiny-roberta", "roberta", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, vocab_size=256, max_position_embeddings=130,
                                              type_vocab_size=1, pad_token_id=1), "cls", _BERT_QV, batch=2, seq=16,
              note="CI smoke size"),
    ModelSpec("bert-base", "bert", dict(_BERT_BASE, vocab_size=30522), "cls", _BERT_QV, batch=32, seq=128,
              note="BERT-base"),
    ModelSpec("roberta-base", "roberta", dict(_BERT_BASE, vocab_size=50265, max_position_embeddings=514,
                                              type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5),
              "cls", _BERT_QV, batch=32, seq=128, note="RoBERTa-base"),
]}


def _config(spec: ModelSpec):
    import transformers as T

    cls = {"llama": T.LlamaConfig, "bert": T.BertConfig, "roberta": T.RobertaConfig}[spec.family]
    cfg = cls(**spec.config)
    if spec.family == "llama":
        cfg.max_position_embeddings = max(2048, spec.seq)
    if spec.task == "cls":
        cfg.num_labels = 2
    return cfg


def spec_from_env(default: str = "tiny") -> ModelSpec:
    name = os.environ.get("PEFTKERN_BENCH_MODEL", default)
    if name not in MODELS:
        raise ValueError(f"PEFTKERN_BENCH_MODEL={name!r} is not known; valid: {', '.join(MODELS)}")

    def num(var):
        return int(os.environ[var]) if os.environ.get(var) else None

    return MODELS[name].with_(num("PEFTKERN_BENCH_LAYERS"), num("PEFTKERN_BENCH_BATCH"), num("PEFTKERN_BENCH_SEQ"))


def rounds() -> int:
    """Timed rounds per suite benchmark (PEFTKERN_BENCH_ROUNDS, default 3): each is a whole
    training step, so a few suffice; --benchmark-disable runs one regardless."""
    return int(os.environ.get("PEFTKERN_BENCH_ROUNDS", "3"))


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    # GPU comparisons run in bf16 (how such models are trained); the CPU in fp32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fused_backend(device: torch.device) -> str:
    """The engine's fused backend for this device: what users get from backend="auto"."""
    return "triton" if device.type == "cuda" else "cpp"


def to_4bit(root: torch.nn.Module, compute_dtype: torch.dtype, device="cpu") -> torch.nn.Module:
    """``root`` with every nn.Linear below it replaced, in place, by a bitsandbytes NF4 ``Linear4bit``
    (double quantization, ``compute_dtype``) holding its weight, quantized as bitsandbytes does when
    a layer moves to its device: QLoRA's base from the same weights. Returns ``root``."""
    import bitsandbytes as bnb

    for name, child in list(root.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                  device="cpu")
            q.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in child.state_dict().items()})
            q.requires_grad_(False)
            setattr(root, name, q.to(device))
        else:
            to_4bit(child, compute_dtype, device)
    return root


def build_base(spec: ModelSpec, seed: int = 0, device: Optional[torch.device] = None) -> torch.nn.Module:
    """The frozen base model, random weights, shared by every provider (see ``sharing_copy``)."""
    import transformers as T

    device = device or bench_device()
    torch.manual_seed(seed)
    cfg = _config(spec)
    model = (T.AutoModelForCausalLM if spec.task == "lm" else T.AutoModelForSequenceClassification).from_config(cfg)
    model = model.to(device=device, dtype=bench_dtype(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def make_batch(spec: ModelSpec, seed: int = 1, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, spec.vocab, (spec.batch, spec.seq), generator=g)
    labels = ids if spec.task == "lm" else torch.randint(0, 2, (spec.batch,), generator=g)
    device = device or bench_device()
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def task_loss(model: torch.nn.Module, batch: Dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The task's cross-entropy computed from the logits: no regulariser that a method's hook or
    PEFT's AdaLoRA adds to ``outputs.loss``, so that providers compare like for like."""
    logits = model(input_ids=batch["input_ids"]).logits.float()
    if task == "lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    return F.cross_entropy(logits, batch["labels"])


# --- providers ---------------------------------------------------------------------------------


@dataclass
class StepRunner:
    """One training step: forward (loss with the method's regulariser), backward, optimizer step,
    and allocation (ours runs in the optimizer-step hook; PEFT's AdaLoRA in ``after_step``)."""

    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    after_step: Optional[Callable[[int], None]] = None
    steps: int = 0
    paths: Dict[str, int] = field(default_factory=dict)

    def step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return train_step(self, batch)

    def collect_paths(self) -> None:  # bench_cpu_step.time_interleaved calls it
        pass


@dataclass(frozen=True)
class Provider:
    name: str
    impl: str  # "floor" | "peftkern" | "peft"
    method: Optional[str]  # peftkern method name (None: floor or PEFT)
    make: Callable[[torch.nn.Module, ModelSpec], StepRunner]
    exports_to_peft: bool = False  # ours: checked against PEFT LoRA loaded from export_peft


RANK, ALPHA = 8, 16.0


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def vera_rank(spec: ModelSpec) -> int:
    """VeRA's r: 128 where the narrowest target allows it (GQA makes v_proj narrow)."""
    c = spec.config
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    narrowest = min(c["hidden_size"], c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim)
    return min(128, narrowest)


def _floor(base, spec) -> StepRunner:
    model = sharing_copy(base)
    # The embedding output becomes a leaf that requires grad, so backward runs through every
    # layer down to the first (as for an adapter in layer 0) with no weight gradient.
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return StepRunner(model, None)


def ours(method: str, backend: Optional[str] = None, rank: Any = RANK, alpha: Optional[float] = ALPHA,
         **options) -> Callable:
    """Our ``method`` on a sharing copy of the base. ``rank``: an int or a function of the
    ModelSpec; ``alpha=None``: the method's paper default; ``backend=None``: the fused one."""
    def make(base, spec) -> StepRunner:
        model = sharing_copy(base)
        r = rank(spec) if callable(rank) else rank
        peftkern.patch(model, method, rank=r, targets=list(spec.targets), alpha=alpha,
                       backend=backend or fused_backend(base.device), **options)
        return StepRunner(model, _adamw(model))

    return make


def peft_provider(method: str) -> Callable:
    def make(base, spec) -> StepRunner:
        import peft

        task_type = "CAUSAL_LM" if spec.task == "lm" else "SEQ_CLS"
        targets = list(spec.targets)
        configs = {
            "lora": lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0,
                                            bias="none", task_type=task_type),
            "vera": lambda: peft.VeraConfig(r=vera_rank(spec), target_modules=targets, vera_dropout=0.0,
                                            d_initial=0.1, projection_prng_key=0, task_type=task_type),
            "adalora": lambda: peft.AdaLoraConfig(target_r=RANK, init_r=round(1.5 * RANK), lora_alpha=ALPHA,
                                                  target_modules=targets, lora_dropout=0.0, task_type=task_type,
                                                  beta1=0.85, beta2=0.85, orth_reg_weight=0.5, **ADALORA_SCHEDULE),
        }
        model = peft.get_peft_model(sharing_copy(base), configs[method]())
        after = model.base_model.update_and_allocate if method == "adalora" else None
        return StepRunner(model, _adamw(model), after_step=after)

    return make


# LEFT's configurations: A_H B_L generates A, A_L B_H generates B, A_H B_H both.
PG_CONFIGS = {"AH_BL": "A", "AL_BH": "B", "AH_BH": "AB"}
# HyperAdaLoRA prunes every step too (deltaT = 1, as AdaLoRA) for a like-for-like step.
HYPER_SCHEDULE = dict(tinit=0, tfinal=0, deltaT=1, total_step=ADALORA_SCHEDULE["total_step"])

PROVIDERS: Dict[str, Provider] = {p.name: p for p in [
    Provider("floor", "floor", None, _floor),
    Provider("lora", "peftkern", "lora", ours("lora"), exports_to_peft=True),
    Provider("lora_torch", "peftkern", "lora", ours("lora", backend="torch"), exports_to_peft=True),
    Provider("peft_lora", "peft", None, peft_provider("lora")),
    # VeRA and HyperAdaLoRA keep their papers' alpha; the others share PEFT's.
    Provider("vera", "peftkern", "vera", ours("vera", rank=vera_rank, alpha=None), exports_to_peft=True),
    Provider("peft_vera", "peft", None, peft_provider("vera")),
    Provider("adalora", "peftkern", "adalora", ours("adalora", **ADALORA_SCHEDULE), exports_to_peft=True),
    Provider("peft_adalora", "peft", None, peft_provider("adalora")),
    Provider("tied_lora", "peftkern", "tied_lora", ours("tied_lora"), exports_to_peft=True),
    Provider("hyper_adalora", "peftkern", "hyper_adalora", ours("hyper_adalora", alpha=None, **HYPER_SCHEDULE),
             exports_to_peft=True),
] + [Provider(f"{m}" if cfg == "AH_BL" else f"{m}_{cfg}", "peftkern", m, ours(m, generate=gen), exports_to_peft=True)
     for m in ("pg_fixed", "pg_trainable", "pg_pos") for cfg, gen in PG_CONFIGS.items()]}


# --- equivalence: every comparison asserts that the providers compute the same thing ----------


def loss_rtol(model: torch.nn.Module) -> float:
    """fp32: 1e-4. bf16 (GPU runs): backends round differently, so only 1e-2 is meaningful."""
    return 1e-2 if next(model.parameters()).dtype == torch.bfloat16 else 1e-4


def assert_same_initial_loss(runner: StepRunner, reference: torch.Tensor, batch, spec: ModelSpec,
                             rtol: Optional[float] = None) -> torch.Tensor:
    """Every method starts at (or, for HyperAdaLoRA's random state, within rounding of) ΔW = 0,
    so its task loss before training equals the floor's."""
    rtol = rtol or loss_rtol(runner.model)
    with torch.no_grad():
        loss = task_loss(runner.model, batch, spec.task)
    torch.testing.assert_close(loss, reference, rtol=rtol, atol=rtol * float(reference.abs()))
    return loss


def assert_matches_peft_export(provider: Provider, base, batch, spec: ModelSpec, rtol: Optional[float] = None) -> None:
    """A fresh copy of our adapter with every trained tensor moved off its initial value (so ΔW ≠ 0),
    exported with ``peftkern.export_peft`` and loaded into PEFT over the same base: PEFT's task
    loss must equal ours. This checks our forward against PEFT's for every method."""
    import peft

    runner = provider.make(base, spec)
    rtol = rtol or loss_rtol(base)
    g = torch.Generator().manual_seed(7)
    state = runner.model.peftkern
    with torch.no_grad():
        for p in state.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
                p.add_(noise * (0.05 if p.dim() > 1 else 0.5))
        ours_loss = task_loss(runner.model, batch, spec.task)
        base_loss = task_loss(_floor(base, spec).model, batch, spec.task)
        with tempfile.TemporaryDirectory() as d:
            peftkern.export_peft(runner.model, d)
            theirs = peft.PeftModel.from_pretrained(sharing_copy(base), d)
            peft_loss = task_loss(theirs, batch, spec.task)
    assert not torch.isclose(ours_loss, base_loss, rtol=1e-6), "the perturbed adapter changes nothing: no check"
    torch.testing.assert_close(ours_loss, peft_loss, rtol=rtol, atol=rtol * float(peft_loss.abs()))


# --- memory: a fresh process per point -----------------------------------------------------------


# glibc raises its mmap threshold after large frees, so later tensors come from the heap and
# freed memory stays resident: RSS then depends on the allocation history more than on what is
# live. A fixed threshold (which turns the adjustment off) maps every tensor above 128 KiB on its
# own and unmaps it when freed, so the peak RSS follows the peak of live memory.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_memory_child(argv: List[str], script: str) -> Dict[str, float]:
    """Run ``script --child ...`` in a fresh interpreter and return the JSON on its last line."""
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **CHILD_ENV})
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM), Linux >= 4.0: building the model has its
    own peak (random init), which is not what a step costs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_steps_memory(runner: StepRunner, batch, steps: int, device: torch.device) -> Dict[str, float]:
    """Peak memory of ``steps`` training steps. CUDA: max_memory_allocated (MB). CPU: VmHWM after a
    reset right before the first step (the whole process, model included) and RSS before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        for _ in range(steps):
            runner.step(batch)
        torch.cuda.synchronize()
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "before_mb": before,
                "memory_kind": "cuda max_memory_allocated"}
    import gc

    gc.collect()
    before = _status_mb("VmRSS")
    reset_peak_rss()
    for _ in range(steps):
        runner.step(batch)
    return {"peak_mb": _status_mb("VmHWM"), "before_mb": before,
            "memory_kind": "peak RSS (VmHWM) of a fresh process, reset right before the first step"}


# --- results -----------------------------------------------------------------------------------


def write_table(stem: str, title: str, notes: List[str], rows: List[Dict[str, Any]], info: Dict[str, str]) -> None:
    """``stem``.md (notes, machine, table) and ``stem``.csv (rows, each with the machine columns)."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + list(info))
        w.writeheader()
        for r in rows:
            w.writerow({**{c: r.get(c, "") for c in cols}, **info})
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
