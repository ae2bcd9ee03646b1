"""AdaLoRA's per-step ops: the importance scores, updated in place for every adapter tensor in
one call, and the orthogonality regulariser's distances (``gram_distances``).

Per element (Zhang et al. 2023, eqs. 8-9; PEFT's RankAllocator.update_ipt):
    ipt  = |p · ∇p|
    ē    = β1·ē + (1-β1)·ipt           (sensitivity, smoothed)
    Ū    = β2·Ū + (1-β2)·|ipt - ē|     (uncertainty, using the *new* ē)

The expressions are written in exactly PEFT's order of operations so that the float32
results, and therefore the rank pattern, agree bit for bit; the C++ op mirrors them with
floating-point contraction disabled.

Which implementation runs is the backend's (``backend.StepOps``; the C++ extension's on the
CPU, the torch ones below everywhere else), chosen by ``registry.step_op``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from . import registry
from .backend import Backend

Tensor = torch.Tensor


@torch.no_grad()
def update_reference_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg_ipt: Sequence[Tensor],
                      exp_avg_unc: Sequence[Tensor], beta1: float, beta2: float) -> None:
    for p, g, e, u in zip(params, grads, exp_avg_ipt, exp_avg_unc):
        ipt = (p * g).abs()
        e.copy_(beta1 * e + (1 - beta1) * ipt)
        u.copy_(beta2 * u + (1 - beta2) * (ipt - e).abs())


@torch.no_grad()
def update_foreach_(params: List[Tensor], grads: List[Tensor], exp_avg_ipt: List[Tensor],
                    exp_avg_unc: List[Tensor], beta1: float, beta2: float) -> None:
    """``update_reference_`` for all tensors at once with ``torch._foreach_*`` ops: on CUDA about ten
    launches for the whole model instead of about twelve per tensor (three tensors per adapted
    module). Bit for bit the reference in every float dtype: each product is rounded before its
    sum, as in ``beta1 * e + (1 - beta1) * ipt``, and the betas are float64 0-d tensors on the
    tensors' device (a Python scalar in a foreach op is rounded to the list's dtype first on the
    CPU, which ``beta1 * e`` does not do). Every tensor must be on one device."""
    if not params:
        return
    b1, c1, b2, c2 = _betas(params[0].device, beta1, beta2)
    ipt = torch._foreach_mul(params, grads)
    torch._foreach_abs_(ipt)
    torch._foreach_mul_(exp_avg_ipt, b1)
    torch._foreach_add_(exp_avg_ipt, torch._foreach_mul(ipt, c1))
    diff = torch._foreach_sub(ipt, exp_avg_ipt)  # with the *new* ē, as the reference
    torch._foreach_abs_(diff)
    torch._foreach_mul_(diff, c2)
    torch._foreach_mul_(exp_avg_unc, b2)
    torch._foreach_add_(exp_avg_unc, diff)


_BETAS: Dict[tuple, Tuple[Tensor, ...]] = {}


def _betas(device: torch.device, beta1: float, beta2: float) -> Tuple[Tensor, ...]:
    """(β1, 1-β1, β2, 1-β2) as float64 0-d tensors on ``device``, made once (no copy per step)."""
    key = (device, beta1, beta2)
    if key not in _BETAS:
        _BETAS[key] = tuple(torch.full((), b, dtype=torch.float64, device=device)
                            for b in (beta1, 1 - beta1, beta2, 1 - beta2))
    return _BETAS[key]


def update_torch_(params: List[Tensor], grads: List[Tensor], exp_avg_ipt: List[Tensor], exp_avg_unc: List[Tensor],
                  beta1: float, beta2: float) -> None:
    """The torch backend's update: ``update_foreach_`` when every tensor is on one device (one pass
    over the parameters only: this runs every optimizer step, and a gradient and a score buffer live
    on their parameter's device), else the per-tensor reference (a model split across devices)."""
    if len({p.device for p in params}) <= 1:
        update_foreach_(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2)
    else:
        update_reference_(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2)


def update_(backend: Backend, params: List[Tensor], grads: List[Tensor], exp_avg_ipt: List[Tensor],
            exp_avg_unc: List[Tensor], beta1: float, beta2: float) -> str:
    """Update every adapter's scores in one call of ``backend``'s step op (the torch backend's where
    it has none for these tensors, ``registry.step_op``); returns the name of the backend that ran."""
    op, name = registry.step_op(backend, "update_importance", params)
    op(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2)
    return name


def gram_distances_reference(columns: Sequence[Tensor], rows: Sequence[Tensor]) -> Tensor:
    """‖PᵀP − I‖_F for each of ``columns``, then ‖QQᵀ − I‖_F for each of ``rows`` (same r)."""
    grams = [p.t() @ p for p in columns] + [q @ q.t() for q in rows]
    r = grams[0].shape[-1]
    eye = torch.eye(r, device=grams[0].device, dtype=grams[0].dtype)
    diff = torch.stack([(g - eye).reshape(r * r) for g in grams])
    # vector_norm, as PEFT's torch.norm: a zero gradient (not NaN) at exact orthogonality
    return torch.linalg.vector_norm(diff, dim=1)


def gram_distances_batched(columns: Sequence[Tensor], rows: Sequence[Tensor]) -> Tensor:
    """``gram_distances_reference`` with one bmm per group of equally shaped matrices (on CUDA a
    few launches per group instead of a few per matrix: q_proj's and v_proj's P and Q are four
    groups however many layers there are). Same values up to the GEMMs' summation order. Under
    torch.compile the reference is traced instead (its cached permutations are host-side state)."""
    if torch.compiler.is_compiling():
        return gram_distances_reference(columns, rows)
    mats = [(m, True) for m in columns] + [(m, False) for m in rows]
    groups: Dict[tuple, List[int]] = {}
    for i, (m, is_column) in enumerate(mats):
        groups.setdefault((tuple(m.shape), m.dtype, is_column), []).append(i)
    pieces, order = [], []
    for (_, _, is_column), members in groups.items():
        X = torch.stack([mats[i][0] for i in members])
        G = X.transpose(1, 2) @ X if is_column else X @ X.transpose(1, 2)  # [g, r, r]
        r = G.shape[-1]
        diff = G - torch.eye(r, device=G.device, dtype=G.dtype)
        pieces.append(torch.linalg.vector_norm(diff.reshape(len(members), r * r), dim=1))
        order += members
    d = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    if order == sorted(order):
        return d
    return d.index_select(0, _inverse(tuple(order), d.device))


_INVERSE: Dict[tuple, Tensor] = {}


def _inverse(order: tuple, device: torch.device) -> Tensor:
    """The permutation that puts ``order``'s entries back in place, on ``device``, made once."""
    key = (order, device)
    if key not in _INVERSE:
        inv = [0] * len(order)
        for pos, i in enumerate(order):
            inv[i] = pos
        _INVERSE[key] = torch.tensor(inv, device=device)
    return _INVERSE[key]


def gram_distances(backend: Backend, columns: List[Tensor], rows: List[Tensor]) -> Tuple[Tensor, str]:
    """The distances of ``gram_distances_reference`` by ``backend``'s step op (the torch backend's where
    it has none for these tensors, ``registry.step_op``), and the name of the backend that ran."""
    op, name = registry.step_op(backend, "gram_distances", list(columns) + list(rows))
    return op(columns, rows), name
