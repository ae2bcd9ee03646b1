"""The training loop's on-device "all finite" record, with no host sync per step.

Forward hooks on the adapter's generator modules (``AdapterState.generators()``: PG's
layer generators, HyperAdaLoRA's state-update networks) and ``observe(loss)`` record, on
the device, the first step at which each produced a non-finite value. The loop calls
``check()`` where it reads the loss anyway (the progress bar, the end of an epoch, before
a checkpoint); a failed check raises ``NonFiniteError`` with the diagnostic pass's
findings (``peftkern.health``) and, given the batch, the first module whose output went
non-finite.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..factors import STATE_ATTR, state_of
from ..health import NonFiniteError, check_finite, first_nonfinite_module, tensors_in, unwrap
from .distributed import Context, all_true

Tensor = torch.Tensor
NO_STEP = -1

class _MarkOutput:
    """Forward hook on a generator module: records the step of its first non-finite output."""

    def __init__(self, monitor: "FiniteMonitor", index: int):
        self.monitor, self.index = monitor, index

    def __call__(self, module, args, output):
        tensors = [t for t in tensors_in(output) if t.is_floating_point() and not t.is_meta]
        if tensors:
            bad = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()
            self.monitor._mark(self.index, bad)


class FiniteMonitor:
    """On-device record of the first non-finite loss and generated factors (module docstring).

    ``observe(loss)`` once per step and the generator hooks only launch tiny device ops;
    ``check()`` reads the record back (one host read) and raises ``NonFiniteError`` if any
    value was not finite; ``observe`` calls it every ``every`` steps (None: never), on every
    rank of ``ctx`` at once. ``start_step`` is the number of optimizer steps already done (a
    resumed run), so that steps are reported as the run counts them.
    """

    def __init__(self, model: nn.Module, start_step: int = 0, every: Optional[int] = None,
                 ctx: Optional[Context] = None):
        self.model = unwrap(model)
        state = state_of(self.model)
        generators = {id(m) for m in state.generators()}
        self.sources = [(f"{STATE_ATTR}.{n}", m) for n, m in state.named_modules() if id(m) in generators]
        self.start_step, self.every, self.ctx = start_step, every, ctx
        self.observed = 0
        self._first_bad: Optional[Tensor] = None  # [1 + sources] int64: index 0 is the loss
        self._step: Optional[Tensor] = None
        self._handles = [m.register_forward_hook(_MarkOutput(self, i + 1)) for i, (_, m) in enumerate(self.sources)]

    def _record(self, device: torch.device) -> Tensor:
        if self._first_bad is None:
            self._first_bad = torch.full((1 + len(self.sources),), NO_STEP, dtype=torch.int64, device=device)
            self._step = torch.full((), self.start_step, dtype=torch.int64, device=device)
        return self._first_bad

    def _mark(self, index: int, bad: Tensor) -> None:
        record = self._record(bad.device)
        current = record[index]
        record[index] = torch.where(bad.to(record.device) & (current == NO_STEP), self._step, current)

    def observe(self, loss: Tensor, batch: Optional[Dict[str, Any]] = None) -> None:
        """Record the loss of the step being run (no host sync), and ``check`` every ``every`` steps."""
        self._mark(0, ~torch.isfinite(loss.detach()).all())
        self._step.add_(1)
        self.observed += 1
        if self.every and self.observed % self.every == 0:
            self.check(self.ctx, batch)

    def check(self, ctx: Optional[Context] = None, batch: Optional[Dict[str, Any]] = None) -> None:
        """Raise NonFiniteError if anything recorded so far was not finite (on any rank, given ``ctx``)."""
        if self._first_bad is None:
            return
        ok = (self._first_bad == NO_STEP).all()
        if ctx is not None:
            ok = all_true(ok, ctx)
        if bool(ok):  # the one host read
            return
        raise NonFiniteError(self.describe(batch))

    def describe(self, batch: Optional[Dict[str, Any]] = None) -> str:
        steps = self._first_bad.tolist()
        names = ["the loss"] + [f"{name} (generated factors)" for name, _ in self.sources]
        seen = [f"{n} first at step {s + 1}" for n, s in zip(names, steps) if s != NO_STEP]
        lines = ["non-finite values during training: " + ("; ".join(seen) or "on another rank")]
        report = check_finite(self.model)
        if not report.ok:
            lines.append(f"first bad adapted module: {report.first_bad_slot or report.findings[0].where}")
            lines.append(str(report))
        elif batch is not None:
            where = first_nonfinite_module(self.model, batch)
            lines.append("every adapter factor and parameter is finite; "
                         + (f"first non-finite output: {where}" if where else "this batch now runs finite"))
        lines.append("lower the learning rate, check the data, or train in a wider dtype")
        return "\n".join(lines)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# --- placement: device and dtype ------------------------------------------------------------------------


__all__ = ["FiniteMonitor", "NO_STEP"]
