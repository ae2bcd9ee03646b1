"""AdaLoRA's importance scores, updated in place for every adapter tensor in one call.

Per element (Zhang et al. 2023, eqs. 8-9; PEFT's RankAllocator.update_ipt):
    ipt  = |p · ∇p|
    ē    = β1·ē + (1-β1)·ipt           (sensitivity, smoothed)
    Ū    = β2·Ū + (1-β2)·|ipt - ē|     (uncertainty, using the *new* ē)

The expressions are written in exactly PEFT's order of operations so that the float32
results, and therefore the rank pattern, agree bit for bit; the C++ op mirrors them with
floating-point contraction disabled.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

Tensor = torch.Tensor


@torch.no_grad()
def update_reference_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg_ipt: Sequence[Tensor],
                      exp_avg_unc: Sequence[Tensor], beta1: float, beta2: float) -> None:
    for p, g, e, u in zip(params, grads, exp_avg_ipt, exp_avg_unc):
        ipt = (p * g).abs()
        e.copy_(beta1 * e + (1 - beta1) * ipt)
        u.copy_(beta2 * u + (1 - beta2) * (ipt - e).abs())


def update_(params: List[Tensor], grads: List[Tensor], exp_avg_ipt: List[Tensor], exp_avg_unc: List[Tensor],
            beta1: float, beta2: float, backend: str = "auto") -> str:
    """Update every adapter's scores in one pass; returns the name of the path that ran.

    ``backend`` "auto" uses the compiled op when the extension provides it for these
    tensors, else the reference. The returned name is what explain()/logs report.
    """
    if backend in ("auto", "cpp"):
        try:
            from . import cpp_backend  # noqa: F401  (raises ImportError if the extension is missing)
            fn = getattr(cpp_backend, "update_importance_", None)
        except ImportError:
            fn = None
        if fn is not None and all(p.device.type == "cpu" for p in params):
            fn(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2)
            return "cpp"
        if backend == "cpp":
            raise RuntimeError("backend='cpp' asked for, but the compiled importance op is unavailable")
    update_reference_(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2)
    return "torch"
