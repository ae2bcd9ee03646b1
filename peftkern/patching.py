"""Swap target modules for AdaptedLinear, and undo it exactly.

``plan`` validates everything and ``build`` creates the adapter state without touching
the model; only ``commit`` mutates it, and commit cannot fail on user input. That is how
every bad-input error leaves the model untouched, and how load() can check a file
against a model before patching it.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import methods, targets as targets_mod
from .factors import STATE_ATTR, AdapterState, Plan, is_patched, state_of
from .layer import AdaptedLinear
from .ops import dispatch


def adapted_modules(model: nn.Module) -> List[Tuple[str, AdaptedLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be a positive int, got {rank!r}")
    if rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank}")
    return int(rank)


def _check_alpha(alpha: Any) -> Optional[float]:
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha == alpha:
        raise TypeError(f"alpha must be a real number, got {alpha!r}")
    return float(alpha)


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def plan(model: nn.Module, method: str, rank: Optional[int] = None, targets=None, alpha=None,
         backend: str = "auto", **options) -> Plan:
    """Validate a patch request against a model; raises before anything is modified.

    ``rank=None`` means the default (8). Methods with a ``resolve_rank`` hook see the value
    as given, so that they can tell an explicit rank from the default (AdaLoRA's target_r).
    """
    spec = methods.get(method)
    requested = None if rank is None else _check_rank(rank)
    rank = methods.DEFAULT_RANK if requested is None else requested
    alpha = _check_alpha(alpha)
    dispatch.check_name(backend)
    opts = methods.parse_options(spec, options)
    if is_patched(model):
        raise ValueError(f"this model is already patched with {state_of(model).plan.method!r}; "
                         "call peftkern.unpatch(model) first")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    slots = targets_mod.find_targets(model, targets)
    size_rank = spec.resolve_rank(requested, opts) if spec.resolve_rank else rank
    for s in slots:
        limit = min(s.in_features, s.out_features)
        if size_rank > limit:
            raise ValueError(f"rank {size_rank} is larger than {s.path} allows ({s.in_features}->{s.out_features}: "
                             f"at most {limit})")
    device, dtype = _param_device_dtype(model)
    p = Plan(method=method, rank=size_rank, alpha=spec.default_alpha(rank) if alpha is None else alpha,
             options=opts, slots=slots, device=device, dtype=dtype, model_type=targets_mod.model_type(model),
             backend=backend, requested_rank=requested)
    validate = getattr(opts, "validate", None)
    if validate is not None:
        validate(p)
    return p


def build(p: Plan) -> AdapterState:
    """Create the method's state for a plan. Touches no model."""
    return methods.get(p.method).build(p)


def commit(model: nn.Module, state: AdapterState, backend: str = "auto") -> nn.Module:
    """Mutate the model: swap targets, register the state, freeze the base, attach hooks."""
    frozen_from: Dict[str, bool] = {n: prm.requires_grad for n, prm in model.named_parameters()}
    for prm in model.parameters():
        prm.requires_grad_(False)
    for slot in state.plan.slots:
        parent_path, _, child = slot.path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, AdaptedLinear(getattr(parent, child), state, slot.index, backend))
    model.add_module(STATE_ATTR, state)
    for name in _trainable_heads(model):
        for prm in model.get_submodule(name).parameters():
            prm.requires_grad_(True)
    state._restore = {"requires_grad": frozen_from, "backend": backend}
    state._handles = list(state.attach(model))
    return model


# Sequence-classification heads stay trainable, as PEFT does for task_type="SEQ_CLS":
# they are freshly initialised and the task cannot be learnt without them.
_HEADS = ("classifier", "score")


def _trainable_heads(model: nn.Module) -> List[str]:
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    return [h for h in _HEADS if isinstance(getattr(model, h, None), nn.Module)]


def uncommit(model: nn.Module) -> nn.Module:
    """Undo commit() exactly: original module objects, original requires_grad flags."""
    state = state_of(model)
    for handle in getattr(state, "_handles", []):
        handle.remove()
    for path, module in adapted_modules(model):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, module.base_layer)
    delattr(model, STATE_ATTR)
    flags = getattr(state, "_restore", {}).get("requires_grad", {})
    for name, prm in model.named_parameters():
        if name in flags:
            prm.requires_grad_(flags[name])
    return model
