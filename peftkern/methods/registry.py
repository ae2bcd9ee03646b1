"""The registry of methods: a name -> (options schema, builder). No if-chains anywhere else.

A method is data plus one small builder. Adding one means writing an options dataclass
(its fields are the method's options, with their defaults) with a ``validate(plan)``
method, and a builder ``Plan -> AdapterState``; patching and the ops do not change.

What a method declares, and where the rest of the engine asks for it (nothing outside
this registry and the state asks a method about itself by name or by attribute):

    Method.options / build / default_alpha / paper     the method as data (here)
    Method.resolve_rank      rank -> the rank that sizes factors (AdaLoRA: target_r -> init_r)
    Method.training_length   the option that takes the run's optimizer-step count (total_step)
    Method.per_module_rank   whether rank_pattern / alpha_pattern may vary ranks per module
    Method.rslora            whether the scale is α/r (so use_rslora's α/√r applies)
    Method.dora              whether use_dora=True (DoRA's magnitude, peftkern/dora.py) applies
    Method.lr                default learning rates (the paper's, the demo's) with their sources
    AdapterState.rank_allocator(), after_optimizer_step(), rank_pattern(), generators(),
    regularization(), extra_config(), tensors_for_save() / load_saved()   (factors.py)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

from ..factors import AdapterState, Plan

BUDGETS = ("paper", "demo", "regression", "sft")


@dataclass(frozen=True)
class LearningRates:
    """A method's default learning rates, one per budget, each with where it comes from.

    ``paper``: the method's paper's rate for the paper's budget (long runs on full datasets).
    ``demo``: the rate of the command line's short classification/regression budget (3 epochs of
    batch 32: the embedded demo's 189 steps on the shipped SST-2 sample), chosen per method on
    held-out training data (benchmarks/demo_defaults.py).
    ``regression``: the short budget's rate on a regression task (SICK-R, STS-B), where a rate at
    the edge of classification's stable range can collapse the encoder's output to a constant
    (benchmarks/results/regression_defaults.md).
    ``sft``: the rate of ``--task sft``'s default budget (one epoch, batch 8, on a causal LM),
    chosen per method on held-out GSM8K training data (benchmarks/sft_table.py)."""

    paper: float
    paper_source: str
    demo: float
    demo_source: str = "chosen on a held-out tenth of the demo sample's training data " \
                       "(README, Results)"
    regression: Optional[float] = None
    regression_source: str = ""
    sft: Optional[float] = None
    sft_source: str = "chosen on held-out GSM8K training data with SmolLM2-135M-Instruct " \
                      "(README, Results)"


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: type  # a dataclass; fields are the options, with defaults
    build: Callable[[Plan], AdapterState]
    default_alpha: Callable[[int], float]  # rank -> alpha
    paper: str = ""
    # hook to turn the public ``rank`` argument into the method's own ranks (AdaLoRA's
    # target_r/init_r); returns the rank that sizes the factors
    resolve_rank: Optional[Callable[[int, Any], int]] = None
    # name of the option that must equal the run's number of optimizer steps (AdaLoRA's
    # schedule length); a training loop fills it when it is not given or is "auto"
    training_length: Optional[str] = None
    # whether ranks and alphas may differ per module (PEFT's rank_pattern / alpha_pattern)
    per_module_rank: bool = False
    # whether the scale is α/r, so that rsLoRA's α/√r (use_rslora) applies
    rslora: bool = True
    # default learning rates of a training loop (peftkern finetune), with their sources
    lr: Optional[LearningRates] = None
    # whether DoRA's magnitude applies (use_dora=True): any fixed low-rank ΔW, not a budgeted SVD
    dora: bool = False


DEFAULT_RANK = 8  # patch(rank=None) means this, for every method

# The embedded demo's learning rate per method: the best held-out accuracy of a grid, on a
# tenth of the demo sample's training data (benchmarks/results/demo_defaults.md).
DEMO_LR = {"lora": 1e-2, "tied_lora": 1e-2, "vera": 2e-2, "pg_fixed": 1e-2, "pg_trainable": 1e-2, "pg_pos": 5e-3,
           "adalora": 2e-2, "hyper_adalora": 2e-2}

# --task sft's default rate per method (one epoch of batch 8 on a causal LM), with its source: the
# lowest held-out loss on 48 GSM8K training problems with SmolLM2-135M-Instruct, seed 100
# (benchmarks/results/sft_table.md for the table's four methods, sft_rates.md for the others).
# lora was measured at 4 rates; tied_lora, vera, adalora and hyper_adalora at 3; pg_pos at 2;
# pg_fixed and pg_trainable at lora's and pg_pos's 1e-2 only (held-out loss 1.017 and 1.015, beside
# lora's 1.014). tied_lora's and vera's best was the top rate tried: higher ones are untried.
_SFT_TABLE = "held-out GSM8K loss with SmolLM2-135M-Instruct, seed 100 (README, Results)"
SFT_LR = {
    "lora": (1e-2, "the best of 5e-4, 2e-3, 1e-2, 3e-2 on " + _SFT_TABLE),
    "tied_lora": (3e-2, "the best of 2e-3, 1e-2, 3e-2 on " + _SFT_TABLE),
    "vera": (1e-1, "the best of 1e-2, 3e-2, 1e-1 on " + _SFT_TABLE),
    "pg_pos": (1e-2, "the best of 1e-2, 3e-2 on " + _SFT_TABLE),
    "pg_fixed": (1e-2, "lora's and pg_pos's rate, the only one tried, on " + _SFT_TABLE),
    "pg_trainable": (1e-2, "lora's and pg_pos's rate, the only one tried, on " + _SFT_TABLE),
    "adalora": (3e-2, "the best of 1e-2, 3e-2, 1e-1 on " + _SFT_TABLE),
    "hyper_adalora": (3e-2, "the best of 1e-2, 3e-2, 1e-1 on " + _SFT_TABLE),
}


# The short budget's rate on a regression task, where it differs from the classification rate:
# LoRA at 1e-2 (its SST-2 rate, the best of the demo grid with collapse at 2e-2) turned SICK-R's
# [CLS] output into a constant at seed 100 (Pearson -0.04 on the test set, with or without
# gradient clipping or warm-up); at 2e-3 the same run reached 0.86. PG-Fixed collapsed the same
# way at 1e-2 (0.13), so the PG methods take PG-Pos's 5e-3, which trained (0.86). Every other
# method keeps its classification rate, which trained on SICK-R
# (benchmarks/results/regression_defaults.md).
_SICKR = "SICK-R at seed 100: 1e-2 collapsed to the mean (README, Results)"
_PG_SICKR = "pg_pos's rate; on SICK-R at seed 100 pg_fixed at 1e-2 collapsed to the mean " \
            "(README, Results)"
REGRESSION_LR = {"lora": (2e-3, _SICKR), "pg_fixed": (5e-3, _PG_SICKR), "pg_trainable": (5e-3, _PG_SICKR)}


def rates(name: str, paper: float, paper_source: str) -> "LearningRates":
    """A method's LearningRates: the paper's as given, the short budget's, regression's and SFT's
    from the tables above."""
    sft, sft_source = SFT_LR[name]
    demo = LearningRates(paper, paper_source, DEMO_LR[name]).demo_source
    regression, regression_source = REGRESSION_LR.get(name, (DEMO_LR[name], "the classification rate: " + demo))
    return LearningRates(paper, paper_source, DEMO_LR[name], regression=regression,
                         regression_source=regression_source, sft=sft, sft_source=sft_source)


_METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if not dataclasses.is_dataclass(method.options):
        raise TypeError(f"options of {method.name!r} must be a dataclass")
    _METHODS[method.name] = method
    return method


def get(name: Any) -> Method:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}; valid methods: {', '.join(names())}")
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(names())}")
    return _METHODS[name]


def names() -> List[str]:
    return sorted(_METHODS)


def summaries() -> Dict[str, str]:
    return {n: _METHODS[n].summary for n in names()}


def default_lr(name: str, budget: str) -> tuple:
    """(learning rate, where it comes from) of method ``name`` for ``budget`` (one of BUDGETS).
    Raises ValueError when the method declares none for that budget."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; valid choices: {', '.join(BUDGETS)}")
    rates = get(name).lr
    rate = None if rates is None else getattr(rates, budget)
    if rate is None:
        raise ValueError(f"method {name!r} declares no default learning rate for the {budget} budget; pass one (--lr)")
    return rate, getattr(rates, f"{budget}_source")


def with_training_length(name: str, options: Mapping[str, Any], total_steps: int) -> Dict[str, Any]:
    """``options`` with the method's training-length option set to ``total_steps`` when the method
    has one and it is not given or is "auto" (a loop knows its length; users should not have to)."""
    option = get(name).training_length
    out = dict(options)
    if option is not None and out.get(option) in (None, "auto"):
        out[option] = total_steps
    return out


# PEFT's LoraConfig names for what patch() takes as its own arguments: a user who types PEFT's
# name gets told the peftkern one instead of a bare "unknown option".
PEFT_NAMES = {"target_modules": "targets", "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


def parse_options(method: Method, options: Mapping[str, Any]) -> Any:
    """Options dict -> the method's validated options dataclass (TypeError for unknown names)."""
    valid = [f.name for f in dataclasses.fields(method.options)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        renamed = [f"PEFT's {n}= is patch's {PEFT_NAMES[n]}=" for n in unknown if n in PEFT_NAMES]
        raise TypeError(
            f"method {method.name!r} does not take option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or '(none)'}" + (f" ({'; '.join(renamed)})" if renamed else "")
        )
    return method.options(**options)
