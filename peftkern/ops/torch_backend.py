"""The "torch" backend: autograd Functions with hand-written backwards, built from ATen calls.

Why hand-written: autograd on the reference expression materialises M×N temporaries
(v ⊙ z, s·z) and saves them. Here every diagonal scaling is folded into the tiny rank-r
factors instead, so neither direction ever writes an M×N tensor beyond y and dx:

    forward   h  = x·Aᵀ                      [M, r]   (saved: x and h, nothing else)
              y  = x·W0ᵀ + b;  y += s·(h⊙u)·(v⊙B)ᵀ          (one in-place addmm)
    backward  dhu = s·dy·(v⊙B)               [M, r]
              Gt  = dyᵀ·(h⊙u)                [N, r]   → dB = s·v⊙Gt,  dv = s·Σ_j B⊙Gt
              du  = Σ_m h⊙dhu;   dh = u⊙dhu
              dA  = dhᵀ·x;       dx = dy·W0 + dh·A           (one in-place addmm)

dv is an M×N reduction in the reference (Σ_m dy ⊙ (B·hu)); the identity
Σ_m dy[m,n]·Σ_j hu[m,j]·B[n,j] = Σ_j B[n,j]·Gt[n,j] makes it free once dB's GEMM is done.

The C++ and Triton backends implement exactly this dataflow; this file is what they
are compared with after the reference itself.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def _fold_v(B: Tensor, v: Optional[Tensor]) -> Tensor:
    return B if v is None else B * v[:, None]


def _scale_u(h: Tensor, u: Optional[Tensor]) -> Tensor:
    return h if u is None else h * u


def _base(x2: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()


def _expand_backward(ctx_needs, g, x2, weight, hu, B, v, scale):
    """Gradients of y = x·W0ᵀ + b + s·hu·(v⊙B)ᵀ w.r.t. x (base part only), W0, b, hu, B, v."""
    need_x, need_w, need_b, need_hu, need_B, need_v = ctx_needs
    dx = dw = db = dhu = dB = dv = None
    if need_x:
        dx = g @ weight
    if need_w:
        dw = g.t() @ x2
    if need_b:
        db = g.sum(0)
    if need_hu:
        dhu = (g @ _fold_v(B, v)).mul_(scale)
    if need_B or need_v:
        gt = g.t() @ hu  # [N, r]: shared by dB and dv
        if need_B:
            dB = gt * scale if v is None else gt * (scale * v)[:, None]
        if need_v:
            dv = (gt * B).sum(1).mul_(scale)
    return dx, dw, db, dhu, dB, dv


def _shrink_backward(needs, dhu, x2, h, A, u):
    """Gradients of hu = (x·Aᵀ)⊙u w.r.t. x, A, u given dhu."""
    need_x, need_A, need_u = needs
    dx = dA = du = None
    if need_u:
        du = (dhu * h).sum(0)
    if need_x or need_A:
        dh = _scale_u(dhu, u)
        if need_A:
            dA = dh.t() @ x2
        if need_x:
            dx = dh @ A
    return dx, dA, du


class AdapterFunction(torch.autograd.Function):
    """Fused y = W0·x + b + s·(v ⊙ (B·(u ⊙ (A·x)))) for one target."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, u, v, scale):
        K, N = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, K)
        h = x2 @ A.t()
        y = _base(x2, weight, bias)
        y.addmm_(_scale_u(h, u), _fold_v(B, v).t(), alpha=scale)
        ctx.save_for_backward(x2, weight, A, B, u, v, h)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, A, B, u, v, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = gy.reshape(-1, weight.shape[0])
        hu = _scale_u(h, u)
        need_lowrank_dx = need[0] or need[3] or need[5]
        dx, dw, db, dhu, dB, dv = _expand_backward(
            (need[0], need[1], need[2], need_lowrank_dx, need[4], need[6]), g, x2, weight, hu, B, v, ctx.scale
        )
        dA = du = None
        if need_lowrank_dx:
            dh = _scale_u(dhu, u)
            if need[5]:
                du = (dhu * h).sum(0)
            if need[3]:
                dA = dh.t() @ x2
            if need[0]:
                dx.addmm_(dh, A)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, dA, dB, du, dv, None


class ShrinkFunction(torch.autograd.Function):
    """hu = (x·Aᵀ) ⊙ u: the joint form's shared down-projection."""

    @staticmethod
    def forward(ctx, x, A, u):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ A.t()
        ctx.save_for_backward(x2, A, u, h)
        ctx.x_shape = x.shape
        # With u = None the output *is* h; saving an output is fine for autograd.
        return _scale_u(h, u)

    @staticmethod
    def backward(ctx, dhu):
        x2, A, u, h = ctx.saved_tensors
        dx, dA, du = _shrink_backward(ctx.needs_input_grad, dhu, x2, h, A, u)
        return (dx.view(ctx.x_shape) if dx is not None else None), dA, du


class ExpandFunction(torch.autograd.Function):
    """y = W0·x + b + s·(v ⊙ (B·hu)) given a precomputed hu [M, r]."""

    @staticmethod
    def forward(ctx, x, weight, bias, hu, B, v, scale):
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        y = _base(x2, weight, bias)
        y.addmm_(hu, _fold_v(B, v).t(), alpha=scale)
        ctx.save_for_backward(x2, weight, hu, B, v)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, hu, B, v = ctx.saved_tensors
        g = gy.reshape(-1, weight.shape[0])
        dx, dw, db, dhu, dB, dv = _expand_backward(ctx.needs_input_grad[:6], g, x2, weight, hu, B, v, ctx.scale)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, dhu, dB, dv, None


def adapter(x, weight, bias, A, B, u, v, scale):
    return AdapterFunction.apply(x, weight, bias, A, B, u, v, scale)


def shrink(x, A, u):
    return ShrinkFunction.apply(x, A, u)


def expand(x, weight, bias, hu, B, v, scale):
    return ExpandFunction.apply(x, weight, bias, hu, B, v, scale)
