"""DoRA's column scale (Liu et al. 2024): y = g⊙z + b forward, and one pass over dy for dz = dy⊙g
and dg = Σ_m dy⊙z backward (z read from the output as (y − b)/g, or given).

The forward writes y in place over z (the adapter's own output). The backward's column sums go
to an fp32 accumulator with atomics, one add per (row block, column) per program, and are
divided by g once at the end when z is read from the output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch

Tensor = torch.Tensor


@triton.jit
def _scale_kernel(y_ptr, g_ptr, b_ptr, M, N, sym, syn, HAS_BIAS: tl.constexpr, ACC_DT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    mask = (rows < M)[:, None] & n_ok[None, :]
    ptrs = y_ptr + rows.to(tl.int64)[:, None] * sym + cols[None, :] * syn  # z in, y out (in place)
    z = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DT)
    g = tl.load(g_ptr + cols, mask=n_ok, other=0.0).to(ACC_DT)
    y = z * g[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=n_ok, other=0.0).to(ACC_DT)[None, :]
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_backward_kernel(dy_ptr, s_ptr, g_ptr, b_ptr, dz_ptr, dg_ptr, M, N, sdm, sdn, ssm, ssn, szm, szn,
                           NEED_G: tl.constexpr, NEED_DZ: tl.constexpr, SUB_BIAS: tl.constexpr, ACC_DT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    mask = (rows < M)[:, None] & n_ok[None, :]
    rows64 = rows.to(tl.int64)
    dy = tl.load(dy_ptr + rows64[:, None] * sdm + cols[None, :] * sdn, mask=mask, other=0.0).to(ACC_DT)
    if NEED_DZ:
        g = tl.load(g_ptr + cols, mask=n_ok, other=0.0).to(ACC_DT)
        tl.store(dz_ptr + rows64[:, None] * szm + cols[None, :] * szn, (dy * g[None, :]).to(dz_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_G:
        s = tl.load(s_ptr + rows64[:, None] * ssm + cols[None, :] * ssn, mask=mask, other=0.0).to(ACC_DT)
        if SUB_BIAS:
            s -= tl.load(b_ptr + cols, mask=n_ok, other=0.0).to(ACC_DT)[None, :]
        tl.atomic_add(dg_ptr + cols, tl.sum(dy * s, axis=0), mask=n_ok)


_CONFIGS = _launch.configs([(32, 128, 4, 2), (64, 64, 4, 2), (16, 256, 4, 2), (64, 128, 8, 2)], ("BLOCK_M", "BLOCK_N"))
# in place (y over z): the autotuner must restore z after each config it tries (_launch's docstring)
_SCALE = _launch.Launcher(_scale_kernel, "dora_scale", _CONFIGS, key=("N",), fallback={"BLOCK_M": 16, "BLOCK_N": 32},
                          restore_value=("y_ptr",))
_SCALE_BWD = _launch.Launcher(_scale_backward_kernel, "dora_scale_backward", _CONFIGS, key=("N",),
                              fallback={"BLOCK_M": 16, "BLOCK_N": 32}, reset_to_zero=("dg_ptr",))


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))


def scale_forward(z: Tensor, g: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y = g⊙z + b in place on the 2-D z; returns z."""
    _launch.check_same_dtype("z", z, g=g, bias=bias)
    M, N = z.shape
    if M and N:
        _SCALE(_grid(M, N), z, _launch.vec(g), _launch.vec(bias) if bias is not None else _launch.unused(z),
               M, N, *_launch.strides(z), HAS_BIAS=bias is not None,
               ACC_DT=_launch.dot_meta(z.dtype)["ACC_DT"])
    return z


def scale_backward(dy: Tensor, saved: Tensor, g: Tensor, bias: Optional[Tensor], from_output: bool,
                   need_g: bool, need_dz: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dz, dg): dz = dy⊙g (None unless ``need_dz``: the pass then only reads); dg = Σ_m dy⊙z,
    z = (saved − b)/g if ``from_output`` else saved, in g's dtype. Without dz, g may be wider than
    dy (DoRA's folded route passes an fp32 m itself): it is read only by the final division."""
    _launch.check_same_dtype("dy", dy, saved=saved, g=g if need_dz else None, bias=bias)
    if not need_dz and not g.dtype.is_floating_point:
        raise TypeError(f"triton backend: g has dtype {g.dtype}; it must be a float dtype")
    M, N = dy.shape
    dz = torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dz else None
    acc = _launch.acc_torch_dtype(dy.dtype)
    dg = torch.zeros(N, device=dy.device, dtype=acc) if need_g else None
    if M and N:
        _SCALE_BWD(_grid(M, N), dy, saved, _launch.vec(g),
                   _launch.vec(bias) if bias is not None else _launch.unused(dy), dz if need_dz else _launch.unused(dy),
                   dg if dg is not None else _launch.unused(dy, acc), M, N,
                   *_launch.strides(dy), *_launch.strides(saved), *_launch.strides(dz if need_dz else dy),
                   NEED_G=need_g, NEED_DZ=need_dz, SUB_BIAS=from_output and bias is not None,
                   ACC_DT=_launch.dot_meta(dy.dtype)["ACC_DT"])
    if dg is not None:
        if from_output:  # in the wider of fp32 and g's dtype, written in g's dtype: one launch
            dg = torch.div(dg, g, out=torch.empty_like(g))
        else:
            dg = dg.to(g.dtype)
    return dz, dg


__all__ = ["scale_forward", "scale_backward"]
