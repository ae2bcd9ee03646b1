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
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from . import stamps

Tensor = torch.Tensor


class Casts:
    """Cached low-precision copies of an adapter's parameters, keyed by (parameter, dtype)."""

    def __init__(self):
        self._copies: Dict[Tuple[int, torch.dtype], Tuple[int, tuple, Tensor]] = {}
        self._pruned_at = 0  # the number of copies after the last prune

    def __deepcopy__(self, memo) -> "Casts":  # a copy's parameters are other tensors: it starts empty
        return Casts()

    def __getstate__(self):
        return {"_copies": {}, "_pruned_at": 0}

    def factors(self, f: Any, dtype: torch.dtype) -> Any:
        """A ``Factors`` with A, B, u and v in ``dtype`` (the rest kept), cast or cached as the module docstring says."""
        return dataclasses.replace(f, A=self.cast(f.A, dtype), B=self.cast(f.B, dtype), u=self.cast(f.u, dtype),
                                   v=self.cast(f.v, dtype))

    def cast(self, t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
        """``t`` in ``dtype``: ``t.to(dtype)`` where autograd or a compiled graph must see it, else the cached copy."""
        if t is None or t.dtype == dtype:
            return t
        if (t.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return t.to(dtype)
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


__all__ = ["Casts"]
