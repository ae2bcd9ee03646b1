"""What a cached value was computed from, so that a cache knows when it is stale.

A stamp records per tensor its identity (a weak reference to it, or to the tensor it views),
version counter, storage and dtype: host values, no device sync. Together with the number of
optimizer steps taken so far (``steps()``), it catches every change the caches here must see:

* in-place updates through torch ops (an optimizer's foreach or per-tensor step, ``copy_``,
  a merge): the version counter;
* a parameter replaced (``load_state_dict(assign=True)``, a move or cast): the identity, even
  when the new tensor lands at the freed address with the same version;
* a fused optimizer step (``torch.optim.AdamW(fused=True)``, HF Trainer's and TRL's default
  ``adamw_torch_fused``), which updates parameters without bumping their version counters: the
  step count, kept by a global ``torch.optim`` step hook (any ``torch.optim.Optimizer``:
  bitsandbytes' and accelerate's wrapped ones too).

A change made outside all three (through ``.data``, or by a kernel that bypasses the dispatcher)
is seen at the next optimizer step. Inference tensors keep no version counter: their stamp is
None, which matches nothing, so values computed from them are never reused.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

Tensor = torch.Tensor

_STEPS = [0]


def _stepped(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


# registered at import (a counter, nothing else), so that every optimizer step after peftkern is
# imported is counted, whichever object caches first
_HOOK = register_optimizer_step_post_hook(_stepped)


def steps() -> int:
    """Optimizer steps taken by any torch.optim.Optimizer since peftkern was imported."""
    return _STEPS[0]


def root(t: Tensor) -> Tensor:
    """The tensor ``t`` views (itself if none): factors may be slices of a shared tensor, a new view
    object each forward of the same tensor."""
    return t if t._base is None else t._base


def of(*tensors: Optional[Tensor]) -> Optional[tuple]:
    """The stamp of ``tensors`` (None entries allowed), or None when one is an inference tensor."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif t.is_inference():
            return None
        else:
            out.append((weakref.ref(root(t)), t._version, t.data_ptr(), t.dtype))
    return tuple(out)


def matches(stamp: Optional[tuple], tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether ``tensors`` are the very tensors ``stamp`` was taken of, unchanged since: a tensor that
    died, or another one at its address, never matches."""
    if stamp is None or len(stamp) != len(tensors):
        return False
    for st, t in zip(stamp, tensors):
        if st is None or t is None:
            if st is not t:
                return False
        elif st[0]() is not root(t) or st[1] != t._version or st[2] != t.data_ptr() or st[3] != t.dtype:
            return False
    return True


__all__ = ["steps", "of", "matches", "root"]
