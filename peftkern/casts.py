"""The adapter's factors in the compute dtype, cast once where autograd does not need the cast.

On a bf16/fp16 model the adapter's weights are fp32 (``patch``'s ``autocast_adapter_dtype``, PEFT's
default) and each forward runs in the compute dtype. A factor that is trained while gradients are
on is cast in every forward: that cast's backward carries the gradient to the fp32 weight. Every
other cast has a constant result until its tensor changes: a frozen factor (VeRA's shared
projections, a frozen A or B, PG's frozen factor), and any factor under ``torch.no_grad`` or
``torch.inference_mode`` (evaluation, generation). Those copies are kept here, with a stamp of the
parameter they were made from (``peftkern.stamps``: identity, version, storage, dtype, and the
optimizer step count), and made again only when it changed or a step was taken: generation casts
nothing per token, and VeRA casts its projections once a step, not once a module. A view of a
shared parameter (a module's slice of a tied factor) is cut from the one cached copy of the whole
parameter.

Only parameters are cached: generated factors (hypernetwork outputs) are new tensors each forward.

A trained factor's cast must be in the graph, so it runs once per forward of the model, not per
step; but not once per module. ``attach`` hooks the patched model's own forward: before it runs
with gradients on, one autograd node (``_CastAll``) casts every trained parameter that the last such
forward cast, and its backward casts their gradients back, each by one multi-tensor copy instead
of a cast and a cast-back per factor: on a GPU, where these steps are bound by launching kernels,
4 launches a LoRA module become a few per step. A factor that node did not cast (the first
forward, a submodule called on its own, a view of a shared parameter, a parameter changed since)
is cast alone, as before. Not in a distributed run, where DDP's reducer and FSDP2's sharding
expect each parameter's gradient in its own time, nor under torch.compile, which fuses casts itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import dist, stamps

Tensor = torch.Tensor


class Casts:
    """Cached low-precision copies of an adapter's parameters, keyed by (parameter, dtype)."""

    def __init__(self):
        self._copies: Dict[Tuple[int, torch.dtype], Tuple[int, tuple, Tensor]] = {}
        self._pruned_at = 0  # the number of copies after the last prune
        # trained parameters cast with gradients on, by (id, dtype): what the next forward casts at once
        self._trained: Dict[Tuple[int, torch.dtype], weakref.ref] = {}
        # this forward's copies from _CastAll, by (id, dtype): (optimizer steps, version, copy). The
        # parameters are alive (they are in use), so identity is the key; an in-place change or a step
        # since the copy was made (a forward that raised before its end hook) makes it stale
        self._batch: Dict[Tuple[int, torch.dtype], Tuple[int, int, Tensor]] = {}
        self._open = False  # inside the patched model's forward (between the hooks)
        self._served: set = set()  # keys cast in this forward
        self._shared: set = set()  # keys cast more than once in one forward: never batched

    def __deepcopy__(self, memo) -> "Casts":  # a copy's parameters are other tensors: it starts empty
        return Casts()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def attach(self, model: nn.Module) -> List[Any]:
        """Hooks on the patched model's forward that cast its trained factors together (module docstring)."""
        # always_call: a forward that raises must close too, or a submodule called later would be
        # served that forward's copies
        return [model.register_forward_pre_hook(self._begin), model.register_forward_hook(self._end, always_call=True)]

    def _begin(self, module, args) -> None:
        self._batch, self._served, self._open = {}, set(), True
        if not self._trained or not torch.is_grad_enabled() or torch.compiler.is_compiling() or dist.initialized():
            return
        groups: Dict[tuple, List[nn.Parameter]] = {}
        for key, ref in list(self._trained.items()):
            p = ref()
            if p is None or not p.requires_grad or p.dtype == key[1]:
                del self._trained[key]  # gone, frozen or cast to that dtype: its next cast says again
                continue
            groups.setdefault((p.device, key[1]), []).append(p)
        step = stamps.steps()
        for (_, dtype), params in groups.items():
            for p, copy in zip(params, _CastAll.apply(dtype, *params)):
                self._batch[(id(p), dtype)] = (step, p._version, copy)

    def _end(self, module, args, output) -> None:
        # the graph holds what its backward needs; a later cast runs alone
        self._batch, self._served, self._open = {}, set(), False

    def factors(self, f: Any, dtype: torch.dtype) -> Any:
        """A ``Factors`` with A, B, u and v in ``dtype`` (the rest kept), cast or cached as the module docstring says."""
        return dataclasses.replace(f, A=self.cast(f.A, dtype), B=self.cast(f.B, dtype), u=self.cast(f.u, dtype),
                                   v=self.cast(f.v, dtype))

    def cast(self, t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
        """``t`` in ``dtype``: ``t.to(dtype)`` where autograd or a compiled graph must see it, else the cached copy."""
        if t is None or t.dtype == dtype:
            return t
        if torch.compiler.is_compiling():
            return t.to(dtype)
        if t.requires_grad and torch.is_grad_enabled():
            return self._trained_cast(t, dtype)
        root = stamps.root(t)
        if type(root) is not nn.Parameter or not root.is_contiguous():
            return t.detach().to(dtype)
        key = (id(root), dtype)
        # a fused optimizer bumps no version counter, and a factor frozen now may have been trained at
        # the last step (requires_grad is toggled freely): every step makes every copy stale, which
        # costs a cast per parameter and step, not per module and forward
        step = stamps.steps()
        hit = self._copies.get(key)
        if hit is None or hit[0] != step or not stamps.matches(hit[1], (root,)):
            stamp = stamps.of(root)
            if stamp is None:  # an inference tensor keeps no version: never reused
                return t.detach().to(dtype)
            self._prune()
            # a copy made under inference mode would be an inference tensor, which a later training
            # step could not save for its backward
            with torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext():
                hit = self._copies[key] = (step, stamp, root.detach().to(dtype))
        copy = hit[2]
        if root is t:
            return copy
        return copy.as_strided(t.size(), t.stride(), t.storage_offset() - root.storage_offset())

    def _trained_cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """A trained factor in ``dtype``, in the graph: this forward's batched copy, else ``t.to(dtype)``
        (and a parameter cast so is batched from the next forward on).

        A parameter cast twice in one forward (Tied-LoRA's shared A and B, a module called twice) is
        never batched: its uses' gradients would be summed on the one copy, in the compute dtype,
        where each use's own cast sums them in the parameter's dtype."""
        if not self._open:  # a submodule called on its own: nothing batched, nothing learned
            return t.to(dtype)
        key = (id(t), dtype)
        hit = self._batch.get(key)
        if hit is not None and key not in self._served and hit[0] == stamps.steps() and hit[1] == t._version:
            self._served.add(key)
            return hit[2]
        if type(t) is nn.Parameter and t.is_contiguous():  # a view of a shared one stays a cast of its own
            if key in self._served or key in self._shared:
                self._shared.add(key)
                self._trained.pop(key, None)
            else:
                self._trained[key] = weakref.ref(t)
            self._served.add(key)
        return t.to(dtype)

    def _prune(self) -> None:
        """Drop the copies of parameters that no longer exist (replaced by a load with assign, a move),
        once the cache has doubled since the last prune: a scan per miss would cost every refresh after
        a step the square of the number of parameters."""
        if len(self._copies) < 2 * self._pruned_at + 16:
            return
        dead = [k for k, (_, stamp, _) in self._copies.items() if stamp[0][0]() is None]
        for k in dead:
            del self._copies[k]
        self._pruned_at = len(self._copies)



class _CastAll(torch.autograd.Function):
    """Parameters [any shapes] -> their copies in ``dtype``, forward by one multi-tensor copy, and the
    copies' gradients back to the parameters' dtypes the same way (a gradient autograd did not
    produce, for a copy no module used, stays None)."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: Tensor) -> Tuple[Tensor, ...]:
        # a copy no module used (a layer skipped, LayerDrop; a tower a batch does not reach) must give its
        # parameter no gradient, not a zero one: an optimizer decays and moves a zero gradient's parameter
        ctx.set_materialize_grads(False)
        copies = [torch.empty_like(p, dtype=dtype) for p in params]
        torch._foreach_copy_(copies, list(params))
        ctx.dtypes = [p.dtype for p in params]
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        given = [i for i, g in enumerate(grads) if g is not None]
        out: List[Optional[Tensor]] = [None] * len(grads)
        if given:
            src = [grads[i] for i in given]
            dst = [torch.empty_like(g, dtype=ctx.dtypes[i]) for i, g in zip(given, src)]
            torch._foreach_copy_(dst, src)
            for i, d in zip(given, dst):
                out[i] = d
        return (None, *out)


__all__ = ["Casts"]
