"""Expand: y = W0·x + b + s·(v ⊙ (B·hu)) given a precomputed hu (the joint-QKV form).

The forward is ``lowrank_gemm`` fed hu (the adapter's "prior shrink" variant, with
f = s·v⊙B). The backward is the adapter's without the shrink part: one pass over dy
for dhu and Gt, one GEMM for dx = dy·W0.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _launch
from .adapter_backward import dy_pass, grads_from_gt, up_factor
from .adapter_forward import lowrank_gemm

Tensor = torch.Tensor


class ExpandFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, hu, B, v, scale):
        _launch.check_same_dtype("x", x, weight=weight, bias=bias, hu=hu, B=B, v=v)
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        hu2 = hu.reshape(-1, hu.shape[-1])
        need_x, need_w, need_b, need_hu, need_B, need_v, _ = ctx.needs_input_grad
        f = up_factor(B, None, v, scale, _launch.acc_torch_dtype(x.dtype))
        y, _ = lowrank_gemm(x2, weight, bias, hu2, f, out_dtype=x.dtype)
        ctx.save_for_backward(x2 if need_w else None, weight, hu2 if (need_B or need_v) else None, B, v)
        ctx.scale = scale
        ctx.x_shape, ctx.hu_shape, ctx.hu_dtype = x.shape, hu.shape, hu.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, hu2, B, v = ctx.saved_tensors
        need_x, need_w, need_b, need_hu, need_B, need_v, _ = ctx.needs_input_grad
        N = weight.shape[0]
        s = ctx.scale
        g = gy.reshape(-1, N)
        dx = dw = db = dhu = dB = dv = None
        if need_hu or need_B or need_v:
            fv = up_factor(B, None, v, s, _launch.acc_torch_dtype(g.dtype))
            dhu, gt, _ = dy_pass(g, fv, hu2, None, compute_dh=need_hu, compute_gt=need_B or need_v, compute_du=False)
            dB, dv = grads_from_gt(gt, B, v, s, need_B, need_v)
            if dhu is not None:
                dhu = dhu.to(ctx.hu_dtype).view(ctx.hu_shape)
        if need_x:  # the low-rank part of dx flows through hu into the shrink's backward
            dx, _ = lowrank_gemm(g, weight.t(), None, None, None, out_dtype=g.dtype)
            dx = dx.view(ctx.x_shape)
        if need_w:
            dw = g.t() @ x2
        if need_b:
            db = g.sum(0)
        return dx, dw, db, dhu, dB, dv, None


def expand(x: Tensor, weight: Tensor, bias: Optional[Tensor], hu: Tensor, B: Tensor, v: Optional[Tensor],
           scale: float) -> Tensor:
    return ExpandFunction.apply(x, weight, bias, hu, B, v, scale)
