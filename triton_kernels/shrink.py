"""Shrink: h = x·Aᵀ [M, r] and hu = h ⊙ u, one skinny pass over x.

Used twice: by the adapter forward's "prior shrink" variant (only h, since u is folded
into the up-projection there), and as the joint-QKV form's shared down-projection, where
one hu serves the q, k and v expands (``ShrinkFunction``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from .adapter_backward import grad_a
from .adapter_forward import lowrank_gemm

Tensor = torch.Tensor


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, u_ptr, h_ptr, hu_ptr,
    M, K, R, M_BUCKET,
    sxm, sxk, sar, sak, shm, shr, shum, shur,
    HAS_U: tl.constexpr, STORE_H: tl.constexpr, DOT_DT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    m_ok = rows < M
    r_ok = ranks < R
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * sxm
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DT)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xt = tl.load(x_rows + ks[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptr + ranks[None, :] * sar + ks[:, None] * sak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT_DT), at.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC_DT)
    mask = m_ok[:, None] & r_ok[None, :]
    if STORE_H:
        tl.store(h_ptr + rows64[:, None] * shm + ranks[None, :] * shr, acc.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_U:
        u = tl.load(u_ptr + ranks, mask=r_ok, other=0.0).to(ACC_DT)
        tl.store(hu_ptr + rows64[:, None] * shum + ranks[None, :] * shur, (acc * u[None, :]).to(hu_ptr.dtype.element_ty),
                 mask=mask)


# (BLOCK_M, BLOCK_K, num_warps, num_stages). Memory bound on x: small BLOCK_M keeps enough
# programs in flight to cover the SMs when M is a few thousand tokens.
_SHRINK = _launch.Kernel(
    _shrink_kernel, "shrink",
    _launch.configs([(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4)],
                    ("BLOCK_M", "BLOCK_K")),
    key=("M_BUCKET", "K", "BLOCK_R"),
    fallback={"BLOCK_M": 32, "BLOCK_K": 32},
)


def shrink_forward(x2: Tensor, A: Tensor, u: Optional[Tensor], *, store_h: bool = True
                   ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(h, hu) for a 2-D x. hu is None when u is None (then hu *is* h); h is None unless
    ``store_h`` (with u given and h not needed for backward, only hu is written)."""
    M, K = x2.shape
    R = A.shape[0]
    store_h = store_h or u is None
    h = torch.empty(M, R, device=x2.device, dtype=x2.dtype) if store_h else None
    hu = torch.empty(M, R, device=x2.device, dtype=x2.dtype) if u is not None else None
    dummy = h if h is not None else hu
    _SHRINK(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
            x2, A, _launch.vec(u) if u is not None else dummy, h if h is not None else dummy, hu if hu is not None else dummy,
            M, K, R, _launch.m_bucket(M),
            x2.stride(0), x2.stride(1), A.stride(0), A.stride(1),
            *((h.stride(0), h.stride(1)) if h is not None else (0, 0)),
            *((hu.stride(0), hu.stride(1)) if hu is not None else (0, 0)),
            HAS_U=u is not None, STORE_H=store_h, BLOCK_R=_launch.block_r(R), **_launch.dot_meta(x2.dtype))
    return h, hu


class ShrinkFunction(torch.autograd.Function):
    """hu = (x·Aᵀ) ⊙ u: the joint form's shared down-projection."""

    @staticmethod
    def forward(ctx, x, A, u):
        _launch.check_same_dtype("x", x, A=A, u=u)
        need_x, need_A, need_u = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        h, hu = shrink_forward(x2, A, u, store_h=need_u)
        ctx.save_for_backward(x2 if need_A else None, A, u, h if need_u else None)
        ctx.x_shape = x.shape
        out = h if hu is None else hu
        return out.view(*x.shape[:-1], A.shape[0])

    @staticmethod
    def backward(ctx, dhu):
        x2, A, u, h = ctx.saved_tensors
        need_x, need_A, need_u = ctx.needs_input_grad
        dhu = dhu.reshape(-1, A.shape[0])
        # The tail is M×r elementwise work: plain torch ops, no M×K or M×N temporary.
        du = (dhu * h).sum(0).to(u.dtype) if need_u else None
        dh = dhu if u is None else dhu * u
        dA = grad_a(dh, x2, out_dtype=A.dtype) if need_A else None
        dx = None
        if need_x:
            dx, _ = lowrank_gemm(None, None, None, dh, A.t(), out_dtype=dhu.dtype)
            dx = dx.view(ctx.x_shape)
        return dx, dA, du


def shrink(x: Tensor, A: Tensor, u: Optional[Tensor]) -> Tensor:
    return ShrinkFunction.apply(x, A, u)
