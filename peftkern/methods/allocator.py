"""Rank allocation for the SVD-style methods (adalora, hyper_adalora), with no host sync.

Four pieces, shared by both methods:

* ``Schedule``: PEFT's cubic budget schedule (``RankAllocator.budget_schedule``) and the
  validation of its numbers (init_r, target_r, tinit, tfinal, deltaT, total_step).
* ``ImportanceAllocator``: AdaLoRA's allocator (PEFT's ``RankAllocator``): EMA sensitivity
  and uncertainty of every element of P, Λ, Q, triplet scores, and a global kthvalue
  threshold that zeroes Λ entries in place. The threshold stays a device tensor, masks
  are ``masked_fill_`` with tensor conditions, and the rank pattern is a device bool
  tensor [slots, init_r]; nothing is read back to the host on the step path.
* ``MagnitudePruner``: HyperAdaLoRA's allocator: every ΔT steps it removes the k smallest
  |Λ| among the unpruned components, globally, into a persistent mask. k is a host int
  that follows from the schedule alone (the unpruned count is exactly the last budget).
* Hooks: ``attach_step_hook`` runs allocation after each optimizer step by itself (a
  global optimizer-step post hook that fires only for optimizers holding the adapter's
  parameters), and ``attach_loss_hook`` adds the state's regulariser (the orthogonality
  term, defined in ``methods/adalora.py``) to ``outputs.loss``.

Step convention (PEFT's): allocation for step t runs after the t-th ``optimizer.step()``
(t counted from 0), while the gradients are still there, i.e. before ``zero_grad``.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .. import checks, dist, stamps  # stamps first registers its step counter (StepHookHandle)
from ..ops import importance
from ..ops.registry import Resolver

Tensor = torch.Tensor

AUTO = "auto"  # total_step="auto": filled in later from transformers.Trainer's max_steps (AllocatorCallback)


# --- the schedule ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """PEFT's budget schedule over all slots: warm-up at init_bgt for tinit steps, a cubic
    decrease to target_bgt, then tfinal steps of fine-tuning at the final pattern."""

    init_r: int
    target_r: int
    n_slots: int
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    total_step: Optional[int] = None  # None while total_step="auto" waits for the Trainer

    @staticmethod
    def checked(init_r: int, target_r: int, n_slots: int, tinit: Any, tfinal: Any, deltaT: Any, total_step: Any,
                deltaT_name: str = "deltaT") -> "Schedule":
        tinit, tfinal = checks.integer("tinit", tinit, 0), checks.integer("tfinal", tfinal, 0)
        deltaT = checks.integer(deltaT_name, deltaT, 1)
        if total_step is None:
            raise ValueError("total_step is required (the number of optimizer steps, as PEFT's AdaLoraConfig needs "
                             "it): pass total_step=N, or total_step='auto' under transformers.Trainer with "
                             "peftkern.AllocatorCallback, which fills it from max_steps")
        s = Schedule(init_r, target_r, n_slots, tinit, tfinal, deltaT, None)
        return s if total_step == AUTO else s.with_total_step(total_step)

    def with_total_step(self, total_step: Any) -> "Schedule":
        total = checks.integer("total_step", total_step, 1)
        if self.tinit >= total - self.tfinal:  # PEFT's own check: there must be a budgeting phase
            raise ValueError(f"total_step={total} leaves no budgeting phase after tinit={self.tinit} and before "
                             f"tfinal={self.tfinal}: total_step must be greater than tinit + tfinal "
                             f"({self.tinit + self.tfinal})")
        return dataclasses.replace(self, total_step=total)

    @property
    def init_bgt(self) -> int:
        return self.init_r * self.n_slots

    @property
    def target_bgt(self) -> int:
        return self.target_r * self.n_slots

    @property
    def final_step(self) -> int:
        """The step at which the final pattern is forced: total_step - tfinal."""
        return self.total - self.tfinal

    @property
    def total(self) -> int:
        if self.total_step is None:
            raise RuntimeError("total_step='auto' was never filled in: train with transformers.Trainer and "
                               "callbacks=[peftkern.AllocatorCallback()], or call state.allocator.set_total_step(n)")
        return self.total_step

    def budget(self, step: int) -> Tuple[int, bool]:
        """(budget, mask now?), exactly PEFT's ``budget_schedule`` (same float expression, same int())."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total - self.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (self.total - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.deltaT == 0


class ScheduledAllocator(nn.Module):
    """Common part of both allocators: the schedule and the optimizer-step counter.

    ``global_step`` counts optimizer steps from 0 (PEFT's convention); the Trainer callback
    overwrites it with ``TrainerState.global_step`` so that a resumed run stays in step.
    """

    def __init__(self, schedule: Schedule, n_slots: int, rank: int, device: torch.device):
        super().__init__()
        self.schedule = schedule
        self.global_step = 0
        # The rank pattern: which of each slot's init_r components are kept. Persistent, so
        # a plain state_dict round trip keeps it.
        self.register_buffer("keep", torch.ones(n_slots, rank, dtype=torch.bool, device=device))

    def set_total_step(self, total_step: int) -> None:
        self.schedule = self.schedule.with_total_step(total_step)

    def on_optimizer_step(self, *args: Any) -> None:
        """Allocate for the step that just ran, then count it."""
        self.allocate(self.global_step, *args)
        self.global_step += 1

    def allocate(self, step: int, *args: Any) -> None:
        raise NotImplementedError

    def checkpoint(self) -> Dict[str, Any]:
        """Everything needed to resume allocation exactly: the step counter, total_step and every
        buffer, the EMA scores included (the adapter file leaves those out, as PEFT does)."""
        return {"global_step": self.global_step, "total_step": self.schedule.total_step,
                "buffers": {n: b.detach().clone() for n, b in self.named_buffers()}}

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        """Inverse of ``checkpoint``; raises ValueError before changing anything if it does not fit."""
        own = dict(self.named_buffers())
        saved = checkpoint.get("buffers", {})
        if sorted(saved) != sorted(own):
            raise ValueError(f"allocator checkpoint has buffers {sorted(saved)[:4]}, this adapter needs "
                             f"{sorted(own)[:4]}")
        for n, t in saved.items():
            if tuple(t.shape) != tuple(own[n].shape):
                raise ValueError(f"allocator buffer {n!r} has shape {tuple(t.shape)}, needs {tuple(own[n].shape)}")
        with torch.no_grad():
            for n, t in saved.items():
                own[n].copy_(t)
        if checkpoint.get("total_step") is not None:
            self.set_total_step(checkpoint["total_step"])
        self.global_step = int(checkpoint["global_step"])

    def rank_pattern(self) -> List[List[bool]]:
        """Host copy of the pattern (syncs: for save, explain and users, never the step path)."""
        return self.keep.cpu().tolist()

    def kept(self, slot: int) -> int:
        if self.keep.is_meta:
            return self.keep.shape[1]
        return int(self.keep[slot].sum())


# --- AdaLoRA: importance-based allocation ----------------------------------------------------------


class _SlotScores(nn.Module):
    """EMA sensitivity (ipt) and uncertainty (unc) of one slot's P and Q (optimizer-side state,
    not saved with the adapter, as in PEFT)."""

    def __init__(self, P: Tensor, Q: Tensor):
        super().__init__()
        for name, t in (("P_ipt", P), ("P_unc", P), ("Q_ipt", Q), ("Q_unc", Q)):
            self.register_buffer(name, torch.zeros_like(t, memory_format=torch.contiguous_format), persistent=False)


class ImportanceAllocator(ScheduledAllocator):
    """PEFT's ``RankAllocator`` on typed references, without host sync.

    ``factors`` returns (P list, Λ [slots, r], Q list) of the owning state, read on every
    call (so that ``.to()`` or ``to_empty`` replacing a Parameter can never leave a stale
    reference here); ``backends`` is the state's, whose step op updates the scores.
    """

    def __init__(self, schedule: Schedule, factors: Callable[[], Tuple[Sequence[Tensor], Tensor, Sequence[Tensor]]],
                 beta1: float, beta2: float, backends: Resolver):
        P, lam, Q = factors()
        super().__init__(schedule, lam.shape[0], lam.shape[1], lam.device)
        self._factors = factors
        self._backends = backends
        self.beta1, self.beta2 = beta1, beta2
        self.slot_scores = nn.ModuleList(_SlotScores(p, q) for p, q in zip(P, Q))
        self.register_buffer("lam_ipt", torch.zeros_like(lam), persistent=False)
        self.register_buffer("lam_unc", torch.zeros_like(lam), persistent=False)
        self.importance_path = "not run yet"  # which importance op ran ("cpp" or "torch"), for explain()

    def _apply(self, fn, recurse=True):
        # The scores are not saved (non-persistent, as PEFT keeps them optimizer-side): ``to_empty`` from the
        # meta device (FSDP2's and distributed checkpointing's flows) gives them memory but no values, which a
        # load never fills, so they start again at zero, as at patch time (a review's finding: values up to
        # 1e38 pruned other ranks). A move of real tensors keeps them.
        was_meta = self.lam_ipt.is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.lam_ipt.is_meta:
            with torch.no_grad():
                for scores in (self.lam_ipt, self.lam_unc, *(t for s in self.slot_scores for t in s.buffers())):
                    scores.zero_()
        return out

    @torch.no_grad()
    def allocate(self, step: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(step)``."""
        final = self.schedule.final_step
        if step < final:
            self._update_importance()
            budget, mask_now = self.schedule.budget(step)
            if mask_now:
                self._mask_to_budget(budget)
        elif step == final:  # force the final pattern, then forget the scores (PEFT resets them here)
            self._mask_to_budget(self.schedule.budget(step)[0])
            self._reset_scores()
        else:  # final fine-tuning: mask with the final pattern every step
            self._factors()[1].masked_fill_(~self.keep, 0.0)

    def _update_importance(self) -> None:
        P, lam, Q = self._factors()
        if any(dist.is_shard(t) for t in (lam, *P, *Q)):
            # a review's finding: it failed in torch's foreach ops, "mixed torch.Tensor and DTensor"
            raise NotImplementedError("AdaLoRA's rank allocator needs whole factors and FSDP2 shards them: it does "
                                      "not run under fully_shard; train AdaLoRA under DDP or on one process")
        params, grads, ipts, uncs = [], [], [], []
        pairs = [(lam, self.lam_ipt, self.lam_unc)]
        for s, p, q in zip(self.slot_scores, P, Q):
            pairs += [(p, s.P_ipt, s.P_unc), (q, s.Q_ipt, s.Q_unc)]
        for t, e, u in pairs:
            if t.grad is not None:  # a slot the forward never reached keeps its scores
                params.append(t.detach())
                grads.append(t.grad)
                ipts.append(e)
                uncs.append(u)
        backend = self._backends.get(lam.device.type)
        self.importance_path = importance.update_(backend, params, grads, ipts, uncs, self.beta1, self.beta2)

    def triplet_scores(self) -> Tensor:
        """[slots, r]: Λ-score + mean over Q's row + mean over P's column (PEFT's ``mask_to_budget``)."""
        vector = torch.stack([(s.Q_ipt * s.Q_unc).mean(dim=1) + (s.P_ipt * s.P_unc).mean(dim=0)
                              for s in self.slot_scores])
        return self.lam_ipt * self.lam_unc + vector

    def _mask_to_budget(self, budget: int) -> None:
        k = self.schedule.init_bgt - budget
        if k <= 0:  # nothing to prune (init_r == target_r); PEFT's kthvalue would raise here
            self.keep.fill_(True)
            return
        scores = self.triplet_scores()
        threshold = torch.kthvalue(scores.flatten(), k).values  # a device scalar: no .item()
        # PEFT masks `score <= threshold`; written as its negation so a NaN score is kept, as there.
        self.keep.copy_(~(scores <= threshold))
        self._factors()[1].masked_fill_(~self.keep, 0.0)

    def _reset_scores(self) -> None:
        for t in self.buffers():
            if t is not self.keep:
                t.zero_()


# --- HyperAdaLoRA: magnitude pruning of the generated Λ --------------------------------------------


class MagnitudePruner(ScheduledAllocator):
    """Every ``deltaT`` steps of the budgeting phase, and once more at total_step - tfinal,
    prune the k smallest |Λ| among unpruned components (globally) so that exactly ``budget``
    remain. The mask is persistent: a pruned component never returns."""

    def __init__(self, schedule: Schedule, n_slots: int, rank: int, device: torch.device):
        super().__init__(schedule, n_slots, rank, device)
        self._alive: Optional[int] = n_slots * rank  # host count of kept components; None after a load

    def reload(self) -> None:
        """Call after ``keep`` was loaded: the host count is recomputed once, on the next prune."""
        self._alive = None

    def restore(self, checkpoint: Dict[str, Any]) -> None:
        super().restore(checkpoint)
        self.reload()

    @torch.no_grad()
    def allocate(self, step: int, lam: Tensor) -> None:
        """``lam``: the generated Λ [slots, r] that the last forward used (before masking)."""
        final = self.schedule.final_step
        if step > final:
            return
        budget, due = self.schedule.budget(step)
        if not (due or step == final):
            return
        if self._alive is None:
            self._alive = int(self.keep.sum())  # one sync, only right after a load
        k = self._alive - budget
        if k <= 0:
            return
        # A NaN component is broken: it goes first (NaN would otherwise sort after the +inf of the
        # already-pruned ones, and pruning fewer than k would break the host count).
        scores = lam.detach().abs().nan_to_num(nan=-1.0).masked_fill(~self.keep, float("inf")).flatten()
        smallest = torch.topk(scores, k, largest=False, sorted=False).indices  # exactly k, ties included
        self.keep.view(-1).index_fill_(0, smallest, False)
        self._alive = budget


# --- hooks -----------------------------------------------------------------------------------------


class _OptimizerStepHook:
    """Global optimizer-step post hook that calls ``state.after_optimizer_step()`` for the
    optimizers that hold the state's parameters (decided once per optimizer)."""

    def __init__(self, state: nn.Module):
        self._state = weakref.ref(state)
        self._holds: "weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]" = weakref.WeakKeyDictionary()

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        state = self._holding(optimizer)
        if state is not None:
            state.after_optimizer_step()

    def before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        state = self._holding(optimizer)
        if state is not None:
            state.before_optimizer_step()

    def _holding(self, optimizer: torch.optim.Optimizer) -> Optional[nn.Module]:
        """The state, if it is alive and ``optimizer`` steps its parameters."""
        state = self._state()
        if state is None:
            return None
        holds = self._holds.get(optimizer)
        if holds is None:
            holds = self._holds[optimizer] = _holds_params(optimizer, state)
        return state if holds else None


def _holds_params(optimizer: torch.optim.Optimizer, state: nn.Module) -> bool:
    # A wrapper (accelerate's AcceleratedOptimizer) proxies the inner optimizer's param_groups;
    # only the inner one counts, or a step would allocate twice.
    if isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        return False
    ours = {id(p) for p in state.parameters() if p.requires_grad}
    return any(id(p) in ours for group in optimizer.param_groups for p in group["params"])


# The live states' hooks, by state. One global hook (registered once, never removed) calls them: a
# dropped model leaves this weak table by itself. A hook of its own per state, removed by a finalizer
# when the GC collected the state, could be removed while torch iterated its hook table (the GC runs
# inside another optimizer's step): "OrderedDict mutated during iteration" (a review's finding).
_LIVE: "weakref.WeakKeyDictionary[nn.Module, _OptimizerStepHook]" = weakref.WeakKeyDictionary()
_DISPATCH: List[Any] = []


def _dispatch(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for hook in list(_LIVE.values()):  # a snapshot: a state collected meanwhile is skipped by its hook
        hook(optimizer, args, kwargs)


def _dispatch_pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Optional[tuple]:
    for hook in list(_LIVE.values()):
        hook.before(optimizer, args, kwargs)
    return None


class StepHookHandle:
    """The state's entry in the optimizer-step hooks (``_LIVE``); ``remove()`` takes it out.

    Copying a patched model (deepcopy, pickle) registers the copy's own entry: the handle is
    rebuilt from its (copied) state through ``__reduce__``, so a copy never allocates for the
    original.
    """

    def __init__(self, state: nn.Module, active: bool = True):
        self.state = state
        self.active = active
        if active:
            if not _DISPATCH:  # after stamps' step counter (imported above), whose count this hook reads
                _DISPATCH.append(register_optimizer_step_post_hook(_dispatch))
                _DISPATCH.append(register_optimizer_step_pre_hook(_dispatch_pre))
            _LIVE[state] = _OptimizerStepHook(state)

    def remove(self) -> None:
        if self.active:
            _LIVE.pop(self.state, None)
            self.active = False

    def __reduce__(self):
        return StepHookHandle, (self.state, self.active)


def attach_step_hook(state: nn.Module) -> StepHookHandle:
    return StepHookHandle(state)


def takes_regularization(state: nn.Module, num_items_in_batch: Any = None) -> bool:
    """Whether a loss computed now takes the state's regulariser: every loss, except where the caller
    passes ``num_items_in_batch`` (transformers' Trainer and TRL with a model taking loss kwargs, and
    their ``compute_loss``), and only the first loss with gradients of each gradient-accumulation
    window then.

    With it, each micro-batch's loss is its share of the accumulated batch's, and the shares are
    summed over the window without a division by its length: a term added to each counted once per
    micro-batch (a review's finding: the orthogonality term doubled at gradient_accumulation_steps=2).
    Without it, the caller divides each micro-batch's loss by the window's length (the Trainer then,
    and the usual hand-written loop), and every loss takes the term.

    A window starts where the adapter holds no gradient (``zero_grad``'s default sets them to None:
    also after a step the GradScaler skipped, and at a resume), or after an optimizer step (for a
    ``zero_grad(set_to_none=False)``, where a skipped step leaves the next window without the term).
    A forward recomputed inside the backward (non-reentrant checkpointing of the whole model)
    repeats the decision of the forward it recomputes, the last one."""
    if num_items_in_batch is None or not torch.is_grad_enabled():
        return True
    if torch._C._current_graph_task_id() != -1:  # recomputing in a backward: the graph must match
        return state.__dict__.get("_regularized_last", True)
    allocator = state.rank_allocator()
    step = allocator.global_step if allocator is not None else stamps.steps()
    first = next((p for p in state.parameters() if p.requires_grad), None)
    takes = first is None or first.grad is None or state.__dict__.get("_regularized_at") != step
    if takes:
        state.__dict__["_regularized_at"] = step  # plain attributes: copied and pickled with the state
    state.__dict__["_regularized_last"] = takes
    return takes


def regularization_share(state: nn.Module) -> float:
    """The part of the term one process's loss carries where the caller passes ``num_items_in_batch``
    under data parallelism: the Trainer multiplies such a loss by the number of processes
    (``average_tokens_across_devices``, its default) before DDP averages the gradients, so a term
    added whole in every process counted once per process (a review's finding). 1/world size, or what
    ``AllocatorCallback`` read from the Trainer's arguments (``state.regularization_share``)."""
    share = state.__dict__.get("regularization_share")
    if share is not None:
        return share
    return 1.0 / dist.world_size()


class _LossHook:
    """Root forward hook: ``outputs.loss += state.regularization()`` when the output has a loss (as
    ``takes_regularization`` decides; ``regularization_share`` of it where ``num_items_in_batch`` is
    passed). An object holding its state (not a closure), so that a copied model's hook serves the copy."""

    def __init__(self, state: nn.Module):
        self.state = state

    def __call__(self, module: nn.Module, args: Any, kwargs: Dict[str, Any], output: Any) -> Any:
        loss = getattr(output, "loss", None)
        if self.state.disabled or self.state.reference_pass or not isinstance(loss, Tensor):
            return output
        items = kwargs.get("num_items_in_batch")
        if not takes_regularization(self.state, items):
            return output
        reg = self.state.regularization()
        if reg is not None:
            if items is not None:
                reg = reg * regularization_share(self.state)
            output.loss = loss + reg.to(loss.dtype)  # ModelOutput keeps its key and attribute in step
        return output


def attach_loss_hook(model: nn.Module, state: nn.Module) -> Any:
    return model.register_forward_hook(_LossHook(state), with_kwargs=True)


__all__ = ["AUTO", "Schedule", "ScheduledAllocator", "ImportanceAllocator", "MagnitudePruner",
           "attach_step_hook", "attach_loss_hook", "takes_regularization", "regularization_share"]
