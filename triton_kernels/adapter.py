"""The fused adapter op: y = W0·x + b + s·(v ⊙ (B·(u ⊙ (A·x)))), forward and backward.

Dataflow (the torch backend's, on Triton kernels):

    forward   h = x·Aᵀ [M, r];  y = x·W0ᵀ + b + h·(s·u⊙v⊙B)ᵀ        1 GEMM (+1 skinny shrink, variant b)
    backward  dy_pass:  dh = u⊙(dy·(s·v⊙B)),  Gt = dyᵀ·(h⊙u),  du     1 pass over dy
              dx = dy·W0 + dh·A                                      1 GEMM, low-rank term in the epilogue
              dA = dhᵀ·x                                             1 skinny pass over x
              dB = s·v⊙Gt,  dv = s·Σ_j B⊙Gt                          [N, r] torch ops

Saved for backward: x (only if A or W0 is trained) and h (only if B, u or v is), plus
the parameters; never an M×N tensor.

Forward variant (``set_forward_variant``), the issue's comparison:
  "prior_shrink" (default): a skinny shrink kernel writes h, the GEMM reads it in its
      epilogue. Costs one extra read of x (M·K elements) and a launch.
  "in_loop": h = x·Aᵀ accumulates inside the GEMM's K-loop from the x tile already
      loaded. No extra pass over x, but every N-block recomputes it: extra tensor-core
      work of BLOCK_R/BLOCK_N of the base GEMM (r is padded to >= 16 for tl.dot), i.e.
      12.5-25% at BLOCK_N = 128 and r in 8..32, plus an [BLOCK_M, BLOCK_R] accumulator's
      registers.
At the training shapes we target (M = 4096, K = N >= 2048) the base GEMM is compute
bound, so the in-loop variant's extra MMA work should cost more than re-reading x once;
it should win only when the GEMM is small or memory bound (decode, small M) where the
extra launch dominates. This is a prediction: no GPU was available to measure it, and
``benchmarks/bench_triton_layer.py`` times both.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _launch
from .adapter_backward import dy_pass, grad_a, grads_from_gt, up_factor
from .adapter_forward import lowrank_gemm
from .shrink import shrink_forward

Tensor = torch.Tensor

FORWARD_VARIANTS = ("prior_shrink", "in_loop")
_forward_variant = "prior_shrink"


def set_forward_variant(name: str) -> None:
    """Choose how the forward gets h = x·Aᵀ (see the module docstring)."""
    global _forward_variant
    if name not in FORWARD_VARIANTS:
        raise ValueError(f"unknown forward variant {name!r}; valid choices: {', '.join(FORWARD_VARIANTS)}")
    _forward_variant = name


def forward_variant() -> str:
    return _forward_variant


class AdapterFunction(torch.autograd.Function):
    """Fused y = W0·x + b + s·(v ⊙ (B·(u ⊙ (A·x)))) for one target."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, u, v, scale):
        _launch.check_same_dtype("x", x, weight=weight, bias=bias, A=A, B=B, u=u, v=v)
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        need_x, need_w, need_b, need_A, need_B, need_u, need_v, _ = ctx.needs_input_grad
        need_h = need_B or need_u or need_v  # Gt and du read h; dx and dA do not
        f = up_factor(B, u, v, scale, _launch.acc_torch_dtype(x.dtype))
        if _forward_variant == "in_loop":
            y, h = lowrank_gemm(x2, weight, bias, None, f, a=A, store_h=need_h, out_dtype=x.dtype)
        else:
            h, _ = shrink_forward(x2, A, None)
            y, _ = lowrank_gemm(x2, weight, bias, h, f, out_dtype=x.dtype)
        ctx.save_for_backward(x2 if (need_A or need_w) else None, weight, A, B, u, v, h if need_h else None)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, A, B, u, v, h = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B, need_u, need_v, _ = ctx.needs_input_grad
        N = weight.shape[0]
        s = ctx.scale
        g = gy.reshape(-1, N)
        dx = dw = db = dA = dB = du = dv = None
        need_dh = need_x or need_A
        if need_dh or need_B or need_u or need_v:
            fv = up_factor(B, None, v, s, _launch.acc_torch_dtype(g.dtype))
            dh, gt, du = dy_pass(g, fv, h, u, compute_dh=need_dh, compute_gt=need_B or need_v, compute_du=need_u)
            dB, dv = grads_from_gt(gt, B, v, s, need_B, need_v)
            if du is not None:
                du = du.to(u.dtype)
            if need_A:
                dA = grad_a(dh, x2, out_dtype=A.dtype)
            if need_x:
                dx, _ = lowrank_gemm(g, weight.t(), None, dh, A.t(), out_dtype=g.dtype)
                dx = dx.view(ctx.x_shape)
        # An unfrozen base layer is off the fused path on purpose: plain ATen products.
        if need_w:
            dw = g.t() @ x2
        if need_b:
            db = g.sum(0)
        return dx, dw, db, dA, dB, du, dv, None


def adapter(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, u: Optional[Tensor],
            v: Optional[Tensor], scale: float) -> Tensor:
    return AdapterFunction.apply(x, weight, bias, A, B, u, v, scale)
