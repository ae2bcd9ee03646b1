"""Shrink: h = D(x)·Aᵀ [M, r] and hu = h ⊙ u, one skinny pass over x.

Used twice: by the adapter forward's "prior shrink" variant (only h, since u is folded
into the up-projection there), and as the joint-QKV form's shared down-projection, where
one hu serves the q, k and v expands. With dropout the x tiles are masked in registers
(``_launch.dropout_keep``) and 1/(1-p) is applied to the accumulator: D(x) is never written.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import dropout_keep

Tensor = torch.Tensor


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, u_ptr, h_ptr, hu_ptr,
    M, K, R, M_BUCKET, seed, p, inv,
    sxm, sxk, sar, sak, shm, shr, shum, shur,
    HAS_U: tl.constexpr, STORE_H: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_DT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
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
        if DROPOUT:
            xt = tl.where(dropout_keep(seed, rows64, ks, K, p), xt, tl.zeros_like(xt))
        at = tl.load(a_ptr + ranks[None, :] * sar + ks[:, None] * sak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT_DT), at.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC_DT)
    if DROPOUT:
        acc = acc * inv
    mask = m_ok[:, None] & r_ok[None, :]
    if STORE_H:
        tl.store(h_ptr + rows64[:, None] * shm + ranks[None, :] * shr, acc.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_U:
        u = tl.load(u_ptr + ranks, mask=r_ok, other=0.0).to(ACC_DT)
        tl.store(hu_ptr + rows64[:, None] * shum + ranks[None, :] * shur, (acc * u[None, :]).to(hu_ptr.dtype.element_ty),
                 mask=mask)


# (BLOCK_M, BLOCK_K, num_warps, num_stages). Memory bound on x: small BLOCK_M keeps enough
# programs in flight to cover the SMs when M is a few thousand tokens.
_SHRINK = _launch.Launcher(
    _shrink_kernel, "shrink",
    _launch.configs([(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4),
                     (16, 64, 4, 2)],
                    ("BLOCK_M", "BLOCK_K")),
    key=("M_BUCKET", "K", "BLOCK_R", "DROPOUT"),
    fallback={"BLOCK_M": 32, "BLOCK_K": 32},
)


def shrink_forward(x2: Tensor, A: Tensor, u: Optional[Tensor], *, store_h: bool = True, dropout: float = 0.0,
                   seed: int = 0) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(h, hu) for a 2-D x. hu is None when u is None (then hu *is* h); h is None unless
    ``store_h`` (with u given and h not needed for backward, only hu is written)."""
    M, K = x2.shape
    R = A.shape[0]
    store_h = store_h or u is None
    h = torch.empty(M, R, device=x2.device, dtype=x2.dtype) if store_h else None
    hu = torch.empty(M, R, device=x2.device, dtype=x2.dtype) if u is not None else None
    dummy = h if h is not None else hu
    _SHRINK(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
            x2, A, _launch.vec(u) if u is not None else dummy, h if h is not None else dummy,
            hu if hu is not None else dummy,
            M, K, R, _launch.m_bucket(M), seed, float(dropout), 1.0 / (1.0 - dropout),
            *_launch.strides(x2), *_launch.strides(A), *_launch.strides(h), *_launch.strides(hu),
            HAS_U=u is not None, STORE_H=store_h, DROPOUT=dropout > 0, BLOCK_R=_launch.block_r(R),
            **_launch.dot_meta(x2.dtype))
    return h, hu


@triton.jit
def _mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    keep = dropout_keep(seed, rows64, ks, K, p)
    tl.store(out_ptr + rows64[:, None] * K + ks[None, :], keep.to(tl.float32), mask=(rows < M)[:, None] & (ks < K)[None, :])


def dropout_mask(seed: Tensor, M: int, K: int, p: float, like: Tensor) -> Tensor:
    """The mask every kernel here applies for a call with ``seed``: keep[m, k] in {0, 1}, like ``like``.
    (For tests and diagnostics: the kernels themselves never write a mask.)"""
    out = torch.empty(M, K, device=like.device, dtype=torch.float32)
    _mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](out, M, K, int(seed), float(p), BLOCK_M=32, BLOCK_K=32)
    return out.to(like.dtype)
