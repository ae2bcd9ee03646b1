"""What adalora and hyper_adalora share: the SVD triple P·Λ·Q as the general adapter, PEFT's
AdaLoraConfig options, the ranks, the orthogonality regulariser and the state base.

In the general adapter y = W0·x + s·(v ⊙ (B·(u ⊙ (A·x)))) the SVD triple is P = B [N, r],
Λ = u [r], Q = A [r, K] and v = 1, with r = init_r; rank allocation prunes Λ entries so
that the number kept follows AdaLoRA's cubic budget schedule down to target_r per module
on average (``allocator.Schedule``).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import checks
from ..factors import AdapterState, Plan
from . import allocator as alloc
from .registry import DEFAULT_RANK

Tensor = torch.Tensor

INIT_STD = 0.02  # P, Λ, Q ~ N(0, 0.02) (PEFT; HyperAdaLoRA: "a normal distribution")
ORTH_FORMS = ("peft", "squared")


def resolve_ranks(rank: Optional[int], target_r: Optional[int], init_r: Optional[int]) -> Tuple[int, int]:
    """The public ``rank`` is the target average rank. target_r defaults to it (8 when neither
    is given) and init_r to round(1.5·target_r) (12 for 8, PEFT's defaults). ``rank`` is None
    when the caller did not pass one, so an explicit rank that disagrees with target_r is an error."""
    if target_r is not None:
        target_r = checks.integer("target_r", target_r, 1)
        if rank is not None and target_r != rank:
            raise ValueError(f"rank={rank} and target_r={target_r} disagree: for AdaLoRA-style methods rank is the "
                             f"target average rank, so pass rank={target_r} (and init_r to size the factors)")
    target = target_r if target_r is not None else (DEFAULT_RANK if rank is None else rank)
    init = max(round(1.5 * target), target) if init_r is None else checks.integer("init_r", init_r, 1)
    if target > init:
        raise ValueError(f"target_r ({target}) must not exceed init_r ({init}): ranks are only ever pruned")
    return target, init


def resolve_rank(rank: Optional[int], opts: Any) -> int:
    """The registry's hook: fills target_r and init_r, and sizes the factors at init_r."""
    opts.target_r, opts.init_r = resolve_ranks(rank, opts.target_r, opts.init_r)
    return opts.init_r


def outside_autocast(device_type: str):
    """A block with autocast off on ``device_type``: the orthogonality regulariser runs in the factors'
    own dtype. Under autocast its Gram products would come out in bf16 (a sum of small squares, most
    of it rounded away) and the compiled kernels would refuse them beside the fp32 factors."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def orthogonality(grams: Sequence[Tensor], n_slots: int, form: str) -> Tensor:
    """Distance of P and Q from orthogonality, from their r×r Gram matrices (PᵀP and QQᵀ,
    any batch shape [..., r, r]).

    ``"peft"``: PEFT's AdaLoRA term, the mean over all P and Q matrices of ‖G − I‖_F (not squared).
    ``"squared"``: HyperAdaLoRA eq. (7), ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F, averaged over slots.
    """
    r = grams[0].shape[-1]
    eye = torch.eye(r, device=grams[0].device, dtype=grams[0].dtype)
    diff = torch.cat([(g - eye).reshape(-1, r * r) for g in grams])  # one row per matrix
    if form == "peft":  # vector_norm, as PEFT's torch.norm: a zero gradient (not NaN) at exact orthogonality
        return torch.linalg.vector_norm(diff, dim=1).mean()
    return (diff * diff).sum() / n_slots


def orthogonality_from_distances(distances: Tensor, n_slots: int, form: str) -> Tensor:
    """``orthogonality`` from the per-matrix distances ‖G − I‖_F (ops.importance.gram_distances)."""
    if form == "peft":
        return distances.mean()
    return (distances * distances).sum() / n_slots


@dataclass
class SVDOptions:
    """PEFT's AdaLoraConfig schedule fields and defaults, shared by adalora and hyper_adalora.
    ``rank`` (patch's argument) is target_r.

    Mutable on purpose: ``resolve_rank`` fills target_r and init_r from ``rank`` so the
    saved config records the values actually used."""

    target_r: Optional[int] = None  # default: rank
    init_r: Optional[int] = None  # default: round(1.5 * target_r), 12 for 8 as in PEFT
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # steps between allocations (ΔT)
    total_step: Union[int, str, None] = None  # required: an int, or "auto" under the Trainer callback
    orth_reg_weight: float = 0.5
    orth_form: str = "peft"  # "peft" (‖G−I‖_F, PEFT) or "squared" (‖G−I‖²_F, HyperAdaLoRA eq. 7)

    def validate(self, plan: Plan) -> None:
        self.schedule(len(plan.slots))
        checks.real("orth_reg_weight", self.orth_reg_weight, 0.0)
        checks.choice("orth_form", self.orth_form, ORTH_FORMS)

    def schedule(self, n_slots: int) -> alloc.Schedule:
        return alloc.Schedule.checked(self.init_r, self.target_r, n_slots, self.tinit, self.tfinal, self.deltaT,
                                      self.total_step)


def renamed(options: Any, old: str, new: str) -> None:
    """Accept a deprecated option name for one release: move its value to ``new`` with a warning."""
    value = getattr(options, old)
    if value is None:
        return
    warnings.warn(f"option {old!r} is deprecated; use {new!r} (the same schedule knob, PEFT's name)",
                  DeprecationWarning, stacklevel=4)
    default = type(options).__dataclass_fields__[new].default
    if getattr(options, new) != default and getattr(options, new) != value:
        raise ValueError(f"{old}={value!r} and {new}={getattr(options, new)!r} are the same option; pass only {new}")
    setattr(options, new, value)
    setattr(options, old, None)


class SVDState(AdapterState):
    """Base of the two SVD-triple states: the allocator, the rank pattern, the hooks.

    A subclass sets ``self.allocator`` (an ``allocator.ScheduledAllocator``) and implements
    ``factors``, ``after_optimizer_step`` and ``regularization``."""

    allocator: alloc.ScheduledAllocator

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.opts = plan.options

    def rank_allocator(self) -> alloc.ScheduledAllocator:
        return self.allocator

    def attach(self, model: nn.Module) -> List[Any]:
        return [alloc.attach_step_hook(self), alloc.attach_loss_hook(model, self)]

    def effective_rank(self, slot: int) -> int:
        """Components kept by the current rank pattern (syncs; not on the hot path)."""
        return self.allocator.kept(slot)

    def rank_pattern(self) -> Dict[str, List[bool]]:
        """{module path: [kept?] * init_r} (syncs)."""
        return {s.path: row for s, row in zip(self.plan.slots, self.allocator.rank_pattern())}

    def extra_config(self) -> Dict[str, Any]:
        return {"rank_pattern": self.rank_pattern(), "init_r": self.plan.rank, "target_r": self.opts.target_r,
                "allocator_step": self.allocator.global_step}


def normal(plan: Plan, *shape: int) -> Tensor:
    return nn.init.normal_(plan.new_tensor(*shape), mean=0.0, std=INIT_STD)


__all__ = ["INIT_STD", "ORTH_FORMS", "SVDOptions", "SVDState", "resolve_ranks", "resolve_rank", "orthogonality",
           "orthogonality_from_distances", "renamed", "normal"]
