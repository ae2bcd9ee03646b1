"""Backward kernels of the adapter (dx itself is ``adapter_forward.lowrank_gemm`` with
transposed views: dx = dy·W0 + dh·A).

``dy_pass``: one pass over dy [M, N], grid over row blocks, loop over N:
    dhu = dy·fv          fv = s·v⊙B [N, r]          (complete per row block: no reduction across programs)
    Gt += dyᵀ·hu         hu = h⊙u   [N, r]          (fp32 atomics across row blocks)
    du += Σ_rows h⊙dhu                [r]           (fp32 atomics across row blocks)
    dh  = u⊙dhu          stored [M, r] in the accumulation dtype
From Gt the caller gets dB = s·v⊙Gt and dv = s·Σ_j B⊙Gt with [N, r] torch ops: the M×N
reduction of the reference's dv is never formed.

``grad_a``: dA = dhᵀ·D(x) [r, K], a skinny pass over x (masked in registers with dropout);
grid over K blocks × M splits, the splits reduced with fp32 atomics.

Gt, du and dA are accumulated with atomics into zeroed buffers, so the autotuner must
zero them before each config it benchmarks (``reset_to_zero``). An accumulator a call
does not need gets ``_launch.unused(...)``, never a live tensor: the autotuner zeroes it.

Reduction choice: atomics, not a two-stage buffer. The buffers a two-stage reduction
would need are (M/BLOCK_M)·N·r floats, which for long sequences and wide MLPs is hundreds
of MB; atomics on an [N, r] target have low contention (one add per row block per element).
The cost is that Gt, du and dA are not bitwise deterministic on CUDA (order of fp32 adds).
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
def _dy_pass_kernel(
    dy_ptr, f_ptr, h_ptr, u_ptr, dh_ptr, gt_ptr, du_ptr,
    M, N, R, M_BUCKET,
    sdm, sdn, sfn, sfr, shm, shr, sdhm, sdhr, sgn, sgr,
    HAS_U: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_GT: tl.constexpr, COMPUTE_DU: tl.constexpr,
    DOT_DT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    m_ok = rows < M
    r_ok = ranks < R
    mr_mask = m_ok[:, None] & r_ok[None, :]
    rows64 = rows.to(tl.int64)
    need_dhu: tl.constexpr = COMPUTE_DH or COMPUTE_DU

    if COMPUTE_GT or COMPUTE_DU:
        h = tl.load(h_ptr + rows64[:, None] * shm + ranks[None, :] * shr, mask=mr_mask, other=0.0).to(ACC_DT)
    else:  # h is not needed (and its pointer is a dummy)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DT)
    if HAS_U:
        u = tl.load(u_ptr + ranks, mask=r_ok, other=0.0).to(ACC_DT)
    else:
        u = tl.full((BLOCK_R,), 1.0, ACC_DT)
    hu = (h * u[None, :]).to(DOT_DT)

    dhu = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DT)
    dy_rows = dy_ptr + rows64[:, None] * sdm
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        n_ok = cols < N
        g = tl.load(dy_rows + cols[None, :] * sdn, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DT)
        if need_dhu:
            ft = tl.load(f_ptr + cols[:, None] * sfn + ranks[None, :] * sfr, mask=n_ok[:, None] & r_ok[None, :],
                         other=0.0)
            dhu = tl.dot(g, ft.to(DOT_DT), dhu, input_precision=PREC, out_dtype=ACC_DT)
        if COMPUTE_GT:
            gt = tl.dot(tl.trans(g), hu, input_precision=PREC, out_dtype=ACC_DT)
            tl.atomic_add(gt_ptr + cols[:, None] * sgn + ranks[None, :] * sgr, gt.to(gt_ptr.dtype.element_ty),
                          mask=n_ok[:, None] & r_ok[None, :])

    if COMPUTE_DU:
        tl.atomic_add(du_ptr + ranks, tl.sum(h * dhu, axis=0).to(du_ptr.dtype.element_ty), mask=r_ok)
    if COMPUTE_DH:
        tl.store(dh_ptr + rows64[:, None] * sdhm + ranks[None, :] * sdhr, (dhu * u[None, :]).to(dh_ptr.dtype.element_ty),
                 mask=mr_mask)


_DY_PASS = _launch.Launcher(
    _dy_pass_kernel, "dy_pass",
    _launch.configs([(16, 128, 4, 3), (32, 64, 4, 4), (32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3),
                     (16, 32, 4, 2)],  # the last one fits BLOCK_R = 128
                    ("BLOCK_M", "BLOCK_N")),
    key=("M_BUCKET", "N", "BLOCK_R", "COMPUTE_DH", "COMPUTE_GT", "COMPUTE_DU"),
    fallback={"BLOCK_M": 32, "BLOCK_N": 32},
    reset_to_zero=("gt_ptr", "du_ptr"),  # autotuning re-runs the kernel: atomics must start from zero each time
)


def dy_pass(g: Tensor, fv: Tensor, h: Optional[Tensor], u: Optional[Tensor], *, compute_dh: bool,
            compute_gt: bool, compute_du: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dh [M, r], Gt [N, r], du [r]) in the accumulation dtype; each None unless asked for.

    g = dy [M, N]; fv = s·v⊙B [N, r]; h [M, r] with hu = h⊙u (u None: hu = h, dh = dhu).
    h may be None when neither Gt nor du is asked for.
    """
    M, N = g.shape
    R = fv.shape[1]
    acc = _launch.acc_torch_dtype(g.dtype)
    dh = torch.empty(M, R, device=g.device, dtype=acc) if compute_dh else None
    gt = torch.zeros(N, R, device=g.device, dtype=acc) if compute_gt else None
    du = torch.zeros(R, device=g.device, dtype=acc) if compute_du else None
    _DY_PASS(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
             g, fv, h if h is not None else _launch.unused(g), _launch.vec(u) if u is not None else _launch.unused(g),
             dh if dh is not None else _launch.unused(g, acc),
             gt if gt is not None else _launch.unused(g, acc), du if du is not None else _launch.unused(g, acc),
             M, N, R, _launch.m_bucket(M),
             *_launch.strides(g), *_launch.strides(fv), *_launch.strides(h), *_launch.strides(dh), *_launch.strides(gt),
             HAS_U=u is not None, COMPUTE_DH=compute_dh, COMPUTE_GT=compute_gt, COMPUTE_DU=compute_du,
             BLOCK_R=_launch.block_r(R), **_launch.dot_meta(g.dtype))
    return dh, gt, du


@triton.jit
def _grad_a_kernel(
    dh_ptr, x_ptr, da_ptr,
    M, K, R, SPLIT, M_BUCKET, seed, p, inv,
    sdhm, sdhr, sxm, sxk, sar, sak,
    DROPOUT: tl.constexpr, DOT_DT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    k_ok = ks < K
    r_ok = ranks < R
    # This program's share of the rows, a whole number of BLOCK_M blocks.
    rows_per = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M
    m_start = pid_s * rows_per
    m_end = tl.minimum(m_start + rows_per, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC_DT)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m_ok = rows < m_end
        rows64 = rows.to(tl.int64)
        dht = tl.load(dh_ptr + rows64[:, None] * sdhm + ranks[None, :] * sdhr, mask=m_ok[:, None] & r_ok[None, :],
                      other=0.0)
        xt = tl.load(x_ptr + rows64[:, None] * sxm + ks[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            xt = tl.where(dropout_keep(seed, rows64, ks, K, p), xt, tl.zeros_like(xt))
        acc = tl.dot(tl.trans(dht.to(DOT_DT)), xt.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC_DT)
    if DROPOUT:
        acc = acc * inv
    tl.atomic_add(da_ptr + ranks[:, None] * sar + ks[None, :] * sak, acc.to(da_ptr.dtype.element_ty),
                  mask=r_ok[:, None] & k_ok[None, :])


_GRAD_A = _launch.Launcher(
    _grad_a_kernel, "grad_a",
    _launch.configs([(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                     (32, 32, 4, 2)],
                    ("BLOCK_M", "BLOCK_K")),
    key=("M_BUCKET", "K", "BLOCK_R", "SPLIT", "DROPOUT"),
    fallback={"BLOCK_M": 32, "BLOCK_K": 32},
    reset_to_zero=("da_ptr",),
)

# Rows per M-split of dA: enough splits that K/BLOCK_K × SPLIT programs cover the GPU at
# a few thousand tokens, few enough that the atomics stay cheap.
ROWS_PER_SPLIT = 512
MAX_SPLIT = 16


def grad_a(dh: Tensor, x2: Tensor, *, out_dtype: torch.dtype, split: Optional[int] = None, dropout: float = 0.0,
           seed: int = 0) -> Tensor:
    """dA = dhᵀ·D(x) [r, K] (accumulated in fp32/fp64, returned in ``out_dtype``)."""
    M, K = x2.shape
    R = dh.shape[1]
    split = split or max(1, min(MAX_SPLIT, triton.cdiv(M, ROWS_PER_SPLIT)))
    dA = torch.zeros(R, K, device=x2.device, dtype=_launch.acc_torch_dtype(x2.dtype))
    _GRAD_A(lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), split),
            dh, x2, dA, M, K, R, split, _launch.m_bucket(M), seed, float(dropout), 1.0 / (1.0 - dropout),
            *_launch.strides(dh), *_launch.strides(x2), *_launch.strides(dA),
            DROPOUT=dropout > 0, BLOCK_R=_launch.block_r(R), **_launch.dot_meta(x2.dtype))
    return dA.to(out_dtype)


def up_factor(B: Tensor, u: Optional[Tensor], v: Optional[Tensor], scale: float, dtype: torch.dtype) -> Tensor:
    """s·(v⊙B)⊙u [N, r] in ``dtype``: every diagonal scaling folded into the small factor,
    so no kernel ever scales an M×N tile."""
    f = B.to(dtype) * scale
    if v is not None:
        f = f * v.to(dtype)[:, None]
    if u is not None:
        f = f * u.to(dtype)[None, :]
    return f


def grads_from_gt(gt: Optional[Tensor], B: Tensor, v: Optional[Tensor], scale: float, need_B: bool,
                  need_v: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dB = s·v⊙Gt and dv = s·Σ_j B⊙Gt: [N, r] work, the M×N reduction is already inside Gt."""
    dB = dv = None
    if need_B:
        dB = (gt * scale if v is None else gt * (scale * v.to(gt.dtype))[:, None]).to(B.dtype)
    if need_v:
        dv = ((gt * B.to(gt.dtype)).sum(1) * scale).to(v.dtype)
    return dB, dv
