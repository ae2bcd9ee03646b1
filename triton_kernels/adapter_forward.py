"""One GEMM with a low-rank epilogue: y = x·wᵀ (+ bias) + h·fᵀ.

This single kernel serves every "big" product of the adapter, by passing strides:

    forward      y[M,N]  = x·W0ᵀ + b + h·(s·u⊙v⊙B)ᵀ        h = x·Aᵀ        (u, v, s folded into f)
    expand       y[M,N]  = x·W0ᵀ + b + hu·(s·v⊙B)ᵀ          hu given        (joint QKV)
    backward dx  dx[M,K] = dy·W0 + dh·A    = dy·(W0ᵀ)ᵀ + dh·(Aᵀ)ᵀ            (w := W0ᵀ, f := Aᵀ views)
    shrink dx    dx[M,K] = dh·A             (HAS_BASE = False: no main loop)

The base weight is a dense tensor, or (``W_4BIT``) a bitsandbytes 4-bit W0 whose tiles are
dequantized in registers as the K-loop reaches them (weight4bit.py): QLoRA's base GEMM with
the adapter in the same launch, and no dequantized copy of W0 anywhere. The 4-bit base product
rounds as bitsandbytes' ``matmul_4bit`` does, whatever x's dtype: W0 dequantized through ``W_DT``
(the launcher's choice: bitsandbytes 0.50 rounds through the dtype W0 was quantized from in its
backward only), both operands in the layer's compute dtype (``BASE_DT``), the product (with the
bias) rounded to it; only then is the low-rank term, in x's dtype, added.

Two ways to get h for the forward, one flag, ``FUSE_SHRINK``:
  (a) in-loop:      h = x·Aᵀ accumulated inside the K-loop from the x tile already in
                    registers; every N-block recomputes it, the pid_n == 0 blocks store it.
  (b) prior shrink: h comes from ``shrink.py``'s kernel and is read in the epilogue.
``kernels.py`` picks between them. Accumulation is fp32 (fp64 for fp64 inputs).

Dropout (``_launch.dropout_keep``): ``MASK_INPUT`` masks the x tiles that feed h in the
in-loop variant (never the base product's); ``MASK_LOWRANK`` masks the low-rank term of
the output, which is how dx = dy·W0 + D'(dh·A) gets its dropout in the same launch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import dropout_keep, rounded
from .weight4bit import Weight4bit, dequant_tile

Tensor = torch.Tensor


@triton.jit
def _lowrank_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, a_ptr, f_ptr, y_ptr, hout_ptr,
    q_ptr, qabs_ptr, qcode_ptr, qabs2_ptr, qcode2_ptr, qoff_ptr, Q_BLOCK: tl.constexpr, Q_BLOCK2: tl.constexpr,
    M, N, K, R, M_BUCKET, seed, p, inv,
    sxm, sxk, swn, swk, shm, shr, sar, sak, sfn, sfr, sym, syn, shom, shor,
    W_4BIT: tl.constexpr, NESTED: tl.constexpr,
    W_DT: tl.constexpr, BASE_DT: tl.constexpr, BASE_DOT_DT: tl.constexpr, BASE_PREC: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    STORE_H: tl.constexpr, MASK_INPUT: tl.constexpr, MASK_LOWRANK: tl.constexpr,
    DOT_DT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row-blocks walk the N-blocks together, so W tiles stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    m_ok = rows < M
    n_ok = cols < N
    r_ok = ranks < R
    # 64-bit row/column offsets once, outside the loop: M·K or N·K may exceed 2**31.
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DT)
    hacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DT)
    if HAS_BASE or FUSE_SHRINK:
        x_rows = x_ptr + rows64[:, None] * sxm
        w_cols = w_ptr + cols64[None, :] * swn
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xt = tl.load(x_rows + ks[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DT)
            if HAS_BASE:
                if W_4BIT:  # swn, swk: element strides over W0's flat order (weight4bit.py)
                    flat = cols64[None, :] * swn + ks[:, None].to(tl.int64) * swk
                    wt = dequant_tile(q_ptr, qabs_ptr, qcode_ptr, qabs2_ptr, qcode2_ptr, qoff_ptr, flat,
                                      k_ok[:, None] & n_ok[None, :], Q_BLOCK, Q_BLOCK2, NESTED)
                    # bitsandbytes' roundings (module docstring); each a no-op where the dtypes agree
                    wt = rounded(rounded(wt, W_DT), BASE_DT).to(BASE_DOT_DT)
                    acc = tl.dot(rounded(xt, BASE_DT).to(BASE_DOT_DT), wt, acc, input_precision=BASE_PREC,
                                 out_dtype=ACC_DT)
                else:
                    wt = tl.load(w_cols + ks[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = tl.dot(xt, wt.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC_DT)
            if FUSE_SHRINK:
                at = tl.load(a_ptr + ranks[None, :] * sar + ks[:, None] * sak, mask=k_ok[:, None] & r_ok[None, :],
                             other=0.0)
                xh = xt
                if MASK_INPUT:
                    xh = tl.where(dropout_keep(seed, rows64, ks, K, p), xt, tl.zeros_like(xt))
                hacc = tl.dot(xh, at.to(DOT_DT), hacc, input_precision=PREC, out_dtype=ACC_DT)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(ACC_DT)[None, :]
    if W_4BIT:  # the base product (and bias) in the compute dtype, as bitsandbytes returns it
        acc = rounded(acc, BASE_DT).to(ACC_DT)
    if HAS_LOWRANK:
        if FUSE_SHRINK:
            if MASK_INPUT:
                hacc = hacc * inv
            ht = hacc
            if STORE_H:  # h is saved for backward; one N-block per row-block writes it
                if pid_n == 0:
                    tl.store(hout_ptr + rows64[:, None] * shom + ranks[None, :] * shor,
                             hacc.to(hout_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])
        else:
            ht = tl.load(h_ptr + rows64[:, None] * shm + ranks[None, :] * shr, mask=m_ok[:, None] & r_ok[None, :],
                         other=0.0)
        ft = tl.load(f_ptr + ranks[:, None] * sfr + cols64[None, :] * sfn, mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if MASK_LOWRANK:
            lowrank = tl.dot(ht.to(DOT_DT), ft.to(DOT_DT), input_precision=PREC, out_dtype=ACC_DT)
            keep = dropout_keep(seed, rows64, cols64, N, p)
            acc += tl.where(keep, lowrank * inv, tl.zeros_like(lowrank))
        else:
            acc = tl.dot(ht.to(DOT_DT), ft.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC_DT)

    tl.store(y_ptr + rows64[:, None] * sym + cols64[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): the usual Hopper/Ampere bf16 set.
_GEMM = _launch.Launcher(
    _lowrank_gemm_kernel, "lowrank_gemm",
    _launch.configs([(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (64, 256, 32, 8, 4, 4),
                     (128, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4),
                     (64, 64, 64, 8, 4, 3), (64, 64, 32, 8, 4, 2)],  # the last one fits BLOCK_R = 128
                    ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")),
    key=("M_BUCKET", "N", "K", "BLOCK_R", "HAS_BASE", "FUSE_SHRINK", "W_4BIT"),
    fallback={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
)


def _base_meta(w4: Optional[Weight4bit], dtype: torch.dtype) -> dict:
    """The W_DT / BASE_DT / BASE_DOT_DT / BASE_PREC constexprs: a 4-bit W0's roundings (module
    docstring); for a dense W0 (unused there) x's own dot dtypes."""
    dot = _launch.dot_meta(dtype)
    if w4 is None:
        return {"W_DT": dot["DOT_DT"], "BASE_DT": dot["DOT_DT"], "BASE_DOT_DT": dot["DOT_DT"], "BASE_PREC": dot["PREC"]}
    compute = w4.compute_dtype or dtype
    base = _launch.dot_meta(compute)
    return {"W_DT": _launch.tl_dtype(w4.dtype), "BASE_DT": _launch.tl_dtype(compute), "BASE_DOT_DT": base["DOT_DT"],
            "BASE_PREC": base["PREC"]}


def lowrank_gemm(x: Optional[Tensor], w, bias: Optional[Tensor], h: Optional[Tensor],
                 f: Optional[Tensor], *, out_dtype: torch.dtype, a: Optional[Tensor] = None,
                 store_h: bool = False, dropout: float = 0.0, seed: int = 0,
                 mask_lowrank: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """y[M, N] = x[M, K]·w[N, K]ᵀ (+ bias[N]) + h[M, R]·f[N, R]ᵀ over strided 2-D views.

    x/w may be None (no base product), h/f may be None (no low-rank term); w may be a
    ``Weight4bit`` (a bitsandbytes 4-bit W0 or its transpose, dequantized tile by tile). With ``a``
    [R, K] given and ``h`` None, h = D(x)·aᵀ is computed in the K-loop (variant a) and, if
    ``store_h``, returned as the second value (dtype ``out_dtype``). ``mask_lowrank``
    applies the dropout mask of (seed, p) to the low-rank term of y instead (dx's D').
    """
    fuse = a is not None and h is None
    has_base = w is not None
    w4 = w if isinstance(w, Weight4bit) else None
    if w4 is not None:
        w = None
    has_lowrank = f is not None
    M = x.shape[0] if x is not None else h.shape[0]
    N = (w4 or w).shape[0] if has_base else f.shape[0]
    K = x.shape[1] if x is not None else 0
    R = f.shape[1] if has_lowrank else 1
    device = (x if x is not None else h).device
    y = torch.empty(M, N, device=device, dtype=out_dtype)
    h_out = torch.empty(M, R, device=device, dtype=out_dtype) if fuse and store_h else None
    dummy = y  # never dereferenced: the constexpr flags compile its uses away
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    q = (w4.packed, w4.absmax, w4.code, *((w4.absmax2, w4.code2, w4.offset) if w4.nested else (dummy,) * 3),
         w4.blocksize, w4.blocksize2) if w4 is not None else (dummy,) * 6 + (1, 1)
    _GEMM(grid,
          x if x is not None else dummy, w if w is not None else dummy,
          _launch.vec(bias) if bias is not None else dummy,
          h if h is not None else dummy, a if fuse else dummy, f if has_lowrank else dummy, y,
          h_out if h_out is not None else dummy, *q,
          M, N, K, R, _launch.m_bucket(M), seed, float(dropout), 1.0 / (1.0 - dropout),
          *_launch.strides(x), *(w4.strides if w4 is not None else _launch.strides(w)), *_launch.strides(h),
          *_launch.strides(a if fuse else None), *_launch.strides(f), *_launch.strides(y), *_launch.strides(h_out),
          W_4BIT=w4 is not None, NESTED=w4 is not None and w4.nested, **_base_meta(w4, out_dtype),
          HAS_BASE=has_base, HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, FUSE_SHRINK=fuse,
          STORE_H=h_out is not None, MASK_INPUT=fuse and dropout > 0, MASK_LOWRANK=mask_lowrank and dropout > 0,
          BLOCK_R=_launch.block_r(R), **_launch.dot_meta(out_dtype))
    return y, h_out
