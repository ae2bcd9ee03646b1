"""Finite checks and placement checks: NaN/Inf and misplaced tensors are named, never propagated silently.

Two tools (the training loop's on-device monitor, built on these, is ``app/monitor.py``):

* ``check_finite(model)``: a diagnostic pass (public as ``peftkern.check_finite``). It asks
  the adapter for every slot's factors, generated ones included, and lists each slot and
  factor holding NaN or Inf, first bad slot first, then every adapter or head parameter
  that is not finite. It reads values back to the host: not for the hot path.
  ``first_nonfinite_module(model, batch)`` names the innermost module whose output went
  non-finite on a batch.
* Placement: ``check_placement`` (at load) names the module whose base weight is on
  another device or dtype than the rest, as when only part of a model was moved or cast
  (AdaptedLinear's forward raises ``layer.placement_error`` for the same fault at run time).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from . import quant
from .factors import FACTOR_NAMES, STATE_ATTR, state_of

Tensor = torch.Tensor


class NonFiniteError(FloatingPointError):
    """NaN or Inf in the adapter's factors, its parameters or the loss."""


# --- the diagnostic pass ---------------------------------------------------------------------------


@dataclass
class Finding:
    where: str  # module path (a slot) or parameter name
    what: str  # "A", "B", "u", "v", "m" (a slot's factor; m: DoRA's magnitude) or "parameter"
    count: int  # non-finite entries
    numel: int
    source: str = ""  # where the factor comes from (describe_slot), for slots

    def __str__(self) -> str:
        src = f" ({self.source})" if self.source else ""
        kind = f"factor {self.what}{src}" if self.what != "parameter" else "parameter"
        return f"{self.where}: {kind} has {self.count} non-finite of {self.numel} values"


@dataclass
class FiniteReport:
    findings: List[Finding] = field(default_factory=list)
    slots_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_bad_slot(self) -> Optional[str]:
        return next((f.where for f in self.findings if f.what != "parameter"), None)

    def __str__(self) -> str:
        if self.ok:
            return f"peftkern: every factor of {self.slots_checked} adapted modules and every adapter parameter is finite"
        lines = [str(f) for f in self.findings[:8]]
        if len(self.findings) > 8:
            lines.append(f"... and {len(self.findings) - 8} more")
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise NonFiniteError(f"non-finite adapter values; first bad module: {self.first_bad_slot}\n{self}")


def _nonfinite_counts(tensors: Sequence[Tensor]) -> List[int]:
    """Non-finite entries per tensor, with one host read for all of them."""
    live = [t for t in tensors if not t.is_meta]
    if not live:
        return [0] * len(tensors)
    counts = iter(torch.stack([(~torch.isfinite(t.detach())).sum().to("cpu") for t in live]).tolist())
    return [0 if t.is_meta else next(counts) for t in tensors]


@torch.no_grad()
def check_finite(model: nn.Module) -> FiniteReport:
    """Which adapted modules' factors (generated ones included) and which trained parameters hold
    NaN or Inf, in slot order. Reads values back to the host: a diagnostic, not for every step."""
    inner = unwrap(model)
    state = state_of(inner)
    report = FiniteReport(slots_checked=len(state.plan.slots))
    tensors, where = [], []
    for slot in state.plan.slots:
        f = state.factors(slot.index)
        for name in FACTOR_NAMES:
            t = getattr(f, name)
            if t is not None:
                tensors.append(t)
                where.append((slot, name))
        if state.dora is not None:  # by its module too (a review's finding: only its parameter index was named)
            tensors.append(state.dora.magnitude(slot.index))
            where.append((slot, "m"))
    for (slot, name), n, t in zip(where, _nonfinite_counts(tensors), tensors):
        if n:
            source = "DoRA magnitude" if name == "m" else state.describe_slot(slot.index).get(name, "")
            report.findings.append(Finding(slot.path, name, n, t.numel(), source))
    own = {id(p) for p in state.parameters()}
    params = [(f"{STATE_ATTR}.{n}", p) for n, p in state.named_parameters()]
    params += [(n, p) for n, p in inner.named_parameters() if p.requires_grad and id(p) not in own]
    for (name, p), n in zip(params, _nonfinite_counts([p for _, p in params])):
        if n:
            report.findings.append(Finding(name, "parameter", n, p.numel()))
    return report


def tensors_in(obj: Any) -> Iterable[Tensor]:
    """Every tensor inside ``obj``: nested dicts (a transformers ``ModelOutput`` is one), lists,
    tuples and dataclasses."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name))


def _all_finite(obj: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors_in(obj) if t.is_floating_point())


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, batch: Dict[str, Any]) -> Optional[str]:
    """Run ``model(**batch)`` once with a hook on every module and name the first module (in the
    order they finish, so the innermost) whose output is not finite, and whether its input was."""
    inner = unwrap(model)
    found: List[str] = []
    names = {id(m): n for n, m in inner.named_modules()}

    def hook(module, args, output):
        if found or _all_finite(output):
            return
        name = names.get(id(module)) or type(module).__name__
        cause = "its input is finite" if _all_finite(args) else "its input is already non-finite"
        found.append(f"{name} ({type(module).__name__}: output non-finite, {cause})")

    handles = [m.register_forward_hook(hook) for m in inner.modules() if m is not inner]
    was_training = inner.training
    try:
        out = inner(**batch)
    finally:
        for h in handles:
            h.remove()
        inner.train(was_training)
    if found:
        return found[0]
    loss = getattr(out, "loss", None)
    if isinstance(loss, Tensor) and not bool(torch.isfinite(loss).all()):
        return "the loss (every module output is finite: check the labels and the loss function)"
    return None


# --- placement: device and dtype ------------------------------------------------------------------------


def check_placement(model: nn.Module, device: torch.device, dtype: torch.dtype, paths: Sequence[str]) -> None:
    """Every target's base weight must be materialised, on ``device``, in ``dtype``: the adapter is one
    module built there. Raises ValueError (device) or TypeError (dtype) naming the first misfit."""
    for path in paths:
        module = model.get_submodule(path)
        weight = module.weight
        if weight.is_meta:
            raise ValueError(f"{path} has its weights on the meta device (not loaded yet): materialise the model "
                             "(from_pretrained, or to_empty and load its weights) before loading an adapter")
        if weight.device != device:
            raise ValueError(f"{path} is on {weight.device} but the model's first parameter is on {device}: one "
                             "adapter serves the whole model, so move the whole model to one device first")
        if weight.dtype != dtype and quant.kind(module) is None:  # a quantized layer's packed weight is uint8
            raise TypeError(f"{path} is {weight.dtype} but the model's first parameter is {dtype}: the adapter "
                            "would be built in one dtype for modules of another; cast the whole model first "
                            "(model.to(dtype))")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers (FSDP2 does not wrap: it returns the model)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


__all__ = ["NonFiniteError", "Finding", "FiniteReport", "check_finite", "first_nonfinite_module", "check_placement",
           "unwrap"]
