"""``AllocatorCallback``: adalora / hyper_adalora under ``transformers.Trainer``.

Allocation itself needs no callback: the state's optimizer-step hook runs it after every
optimizer step (so gradient accumulation allocates once per optimizer step, as the Trainer
steps the optimizer once per accumulation cycle). The callback only keeps the allocator
consistent with the Trainer:

* ``total_step="auto"`` is filled from ``TrainerState.max_steps`` at the start of training;
* before every optimizer step the allocator's counter is set to ``TrainerState.global_step``,
  so a run resumed from a checkpoint continues the schedule where it stopped;
* where the Trainer passes ``num_items_in_batch`` it multiplies the loss by its process count
  (``average_tokens_across_devices``): the orthogonality term the model adds is divided by it;
* if the optimizer cannot carry torch's step hooks (not a ``torch.optim.Optimizer``, e.g. a
  DeepSpeed-managed one), the callback allocates itself, after the step, exactly once.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[peftkern.AllocatorCallback()])
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import torch
from transformers.trainer_callback import TrainerCallback

from ..factors import state_of

log = logging.getLogger("peftkern")


def _state_of(model: Any):
    inner = getattr(model, "module", model)  # DDP / DataParallel wrappers
    state = state_of(inner)
    if state.rank_allocator() is None:
        raise ValueError(f"AllocatorCallback is for methods that allocate ranks (adalora, hyper_adalora); this "
                         f"model uses {state.plan.method!r}, which has no rank allocator")
    return state


def _hookable(optimizer: Any) -> bool:
    """True if torch's optimizer-step hooks will fire for the optimizer doing the work."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps a torch one
    return isinstance(inner, torch.optim.Optimizer)


class AllocatorCallback(TrainerCallback):
    def __init__(self) -> None:
        self._state = None
        self._manual = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._state = st = _state_of(model)
        allocator = st.rank_allocator()
        if allocator.schedule.total_step is None:
            allocator.set_total_step(state.max_steps)
            log.info("peftkern: total_step filled from Trainer max_steps = %d", state.max_steps)
        elif allocator.schedule.total_step != state.max_steps:
            warnings.warn(f"peftkern: total_step={allocator.schedule.total_step} but the Trainer runs "
                          f"max_steps={state.max_steps}; the budget schedule follows total_step", RuntimeWarning)
        allocator.global_step = state.global_step
        # the Trainer multiplies a loss normalised by num_items_in_batch by its process count (allocator.py)
        st.regularization_share = 1.0 / args.world_size if getattr(args, "average_tokens_across_devices", False) else 1.0
        self._manual = optimizer is not None and not _hookable(optimizer)
        if self._manual:
            log.info("peftkern: the optimizer carries no torch step hooks; AllocatorCallback allocates instead")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._state is not None:
            self._state.rank_allocator().global_step = state.global_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        st: Optional[Any] = self._state
        # The hook has already run for hookable optimizers; allocating here too would double it.
        if st is not None and self._manual and st.rank_allocator().global_step == state.global_step:
            st.after_optimizer_step()


__all__ = ["AllocatorCallback"]
