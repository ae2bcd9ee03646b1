"""The "torch" backend: the kernels of ``backend.py`` as a few ATen calls each (cuBLAS on CUDA).

It is the default on CUDA until the Triton kernels pass the GPU suite (registry.py), so
it is written for few launches and no M×N temporaries. Every diagonal scaling is folded
into the rank-r factors or into a GEMM's alpha, never applied in a pass of its own over an
[M, ·] tensor; dropout's 1/(1-p) and s (c = s/(1-p)) ride on the GEMMs' alpha:

    forward   h  = (1/(1-p))·D'(x)·Aᵀ              [M, r]   (PEFT's A·D(x); saved when a gradient reads it)
              y  = x·W0ᵀ + b;  y += s·h·((v⊗u)⊙B)ᵀ          (one in-place addmm, s its alpha)
    backward  Gt  = s·dyᵀ·h                [N, r]  → dB = Gt⊙(v⊗u)
              P   = Gt⊙B                   [N, r]  → dv = P·u,  du = Pᵀ·v
              dh  = c·dy·((v⊗u)⊙B)         [M, r]  (c on the GEMM's alpha)
              dA  = dhᵀ·D'(x);  dx = dy·W0 + D'(dh·A)       (one in-place addmm without dropout)

D' is the dropout mask without its 1/(1-p). s multiplies the second product, as PEFT's does, never
h itself: in fp16 s·h overflows (65504) where h and the output fit (s = 4: an h of 16,400 suffices).
Every gradient of u and v comes from the one [N, r] GEMM Gt, never from a pass over an
[M, ·] tensor: dv is an M×N reduction in the reference (Σ_m dy ⊙ (B·hu)), and
Σ_m dy[m,n]·Σ_j hs[m,j]·u[j]·B[n,j] = Σ_j P[n,j]·u[j]; likewise du[j] = Σ_m hs[m,j]·(dy·(v⊙B))[m,j]
= Σ_n v[n]·P[n,j]. So u and v add only [N, r] work to LoRA's backward (Tied-LoRA, VeRA).
For LoRA (u, v identity, no bias, no dropout) that is 3 launches forward and 5 backward
(benchmarks/bench_launches.py counts them against PEFT's).

Dropout D: ``keep_mask(seed, ...)`` is a Bernoulli(1-p) draw from a private generator
seeded with the call's seed (torch.Generator on x's device), so the backward redraws the
same mask instead of storing it.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import importance
from ..backend import Backend, StepOps
from ..library import acc_dtype, register

Tensor = torch.Tensor


def keep_mask(seed: Tensor, shape, p: float, device, dtype) -> Tensor:
    """This backend's dropout mask: 1 where an element is kept, 0 where dropped (Bernoulli(1-p))."""
    if torch.device(device).type == "meta":  # shapes only: meta has no generator and no values
        return torch.empty(shape, device=device, dtype=dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


def _dropped(x: Tensor, dropout: float, seed: Tensor) -> Tensor:
    """D'(x): the kept elements of x, without the 1/(1-p) factor (folded into a GEMM's alpha)."""
    if not dropout:
        return x
    return x * keep_mask(seed, x.shape, dropout, x.device, x.dtype)


def _mm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """alpha·a·b as one GEMM: alpha rides on BLAS's alpha. With beta=0 the input is never read
    (nor copied into the output), so an empty 0-d tensor stands in for it without a launch."""
    if alpha == 1.0:
        return a @ b
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=alpha)


def _outer(u: Optional[Tensor], v: Optional[Tensor]) -> Optional[Tensor]:
    """v⊗u as a factor of [N, r] tensors (Λv·X·Λu = X⊙(v⊗u)): None when both are the identity,
    a broadcasting row or column when one is, so that applying it is at most one launch."""
    if v is None:
        return u
    return v[:, None] if u is None else torch.outer(v, u)


def _fold(X: Tensor, vu: Optional[Tensor]) -> Tensor:
    """Λv·X·Λu for an [N, r] X, with ``vu`` from ``_outer``: X itself when both are the identity."""
    return X if vu is None else X * vu


def _base(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()


def adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h):
    h = _mm(_dropped(x, dropout, seed), A.t(), 1.0 / (1.0 - dropout))
    up = _fold(B, _outer(u, v)).t()
    if weight is None:  # the low-rank term alone (a base computed elsewhere)
        y = torch.addmm(bias, h, up, alpha=scale) if bias is not None else _mm(h, up, scale)
    else:
        y = _base(x, weight, bias)
        y.addmm_(h, up, alpha=scale)
    return y, (h if save_h else None), None


def _lowrank_backward(dy, x, A, B, u, v, h, scale, dropout, seed, need_x, need_A, need_u, need_B, need_v, dx):
    """The rank-r part of the adapter's backward (module docstring; ``h`` the forward's).
    Adds the low-rank term into ``dx`` in place, or makes dx of it when ``dx`` is None (no base
    weight here: a 4-bit base's own op gives its part). Returns (dx, dA, dB, du, dv)."""
    dA = dB = du = dv = None
    c = scale / (1.0 - dropout)
    vu = _outer(u, v)
    if need_B or need_u or need_v:
        gt = _mm(dy.t(), h, scale)  # [N, r], times s: dB, du and dv all read it
        if need_B:
            dB = _fold(gt, vu).to(B.dtype)
        if need_u or need_v:
            p = gt * B
            if need_v:
                dv = (p.sum(1) if u is None else p @ u).to(v.dtype)
            if need_u:
                du = (p.sum(0) if v is None else p.t() @ v).to(u.dtype)
    if need_x or need_A:
        dh = _mm(dy, _fold(B, vu), c)
        if dropout:
            keep = keep_mask(seed, (dy.shape[0], A.shape[1]), dropout, dy.device, dy.dtype)
            if need_A:
                dA = (dh.t() @ (x * keep)).to(A.dtype)
            if need_x:
                dx = (dh @ A).mul_(keep) if dx is None else dx.addcmul_(dh @ A, keep)
        else:
            if need_A:
                dA = (dh.t() @ x).to(A.dtype)
            if need_x:
                dx = dh @ A if dx is None else dx.addmm_(dh, A)
    return dx, dA, dB, du, dv


def adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, seed, needs):
    need_x, need_w, need_b, need_A, need_B, need_u, need_v = needs
    # without a base weight (a 4-bit base) dx is the low-rank term's alone: no zeros to add it to
    dx = dy @ weight if need_x and weight is not None else None
    dx, dA, dB, du, dv = _lowrank_backward(dy, x, A, B, u, v, h, scale, dropout, seed, need_x, need_A, need_u,
                                           need_B, need_v, dx)
    dw = (dy.t() @ x) if need_w else None
    db = dy.sum(0).to(dy.dtype if weight is None else weight.dtype) if need_b else None
    return [dx, dw, db, dA, dB, du, dv]


def shrink_forward(x, A, u, dropout, seed, save_h):
    h = _mm(_dropped(x, dropout, seed), A.t(), 1.0 / (1.0 - dropout))
    if u is None:
        return h, None
    return h * u, (h if save_h else None)


def shrink_backward(dhu, x, A, u, h, dropout, seed, needs):
    need_x, need_A, need_u = needs
    du = (dhu * h).sum(0).to(u.dtype) if need_u else None
    dx = dA = None
    if need_x or need_A:
        dh = dhu if u is None else dhu * u
        c = 1.0 / (1.0 - dropout)  # on the GEMMs' alpha
        keep = keep_mask(seed, (dhu.shape[0], A.shape[1]), dropout, dhu.device, dhu.dtype) if dropout else None
        if need_A:
            dA = _mm(dh.t(), x if keep is None else x * keep, c).to(A.dtype)
        if need_x:
            dx = _mm(dh, A.to(dh.dtype), c)
            if keep is not None:
                dx.mul_(keep)
    return [dx, dA, du]


def expand_forward(x, weight, bias, hu, B, v, scale):
    y = _base(x, weight, bias)
    return y.addmm_(hu, _fold(B, _outer(None, v)).t(), alpha=scale)


def expand_backward(dy, x, weight, hu, B, v, scale, needs):
    need_x, need_w, need_b, need_hu, need_B, need_v = needs
    dx = dy @ weight if need_x else None
    dhu = dB = dv = None
    if need_hu:
        dhu = _mm(dy, B if v is None else B * v[:, None], scale).to(hu.dtype)
    if need_B or need_v:
        gt = _mm(dy.t(), hu, scale)  # s·Gt: shared by dB and dv
        if need_B:
            dB = (gt if v is None else gt * v[:, None]).to(B.dtype)
        if need_v:
            dv = (gt * B).sum(1).to(v.dtype)
    dw = (dy.t() @ x) if need_w else None
    db = dy.sum(0).to(weight.dtype) if need_b else None
    return [dx, dw, db, dhu, dB, dv]


_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def gelu_grad(z: Tensor) -> Tensor:
    """d/dz of z·Φ(z) = Φ(z) + z·φ(z) (exact erf GeLU)."""
    return 0.5 * (1.0 + torch.erf(z * _SQRT1_2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def hypernet_forward(E, W1, b1, W2, b2, save):
    pre = F.linear(E, W1, b1)
    out = F.linear(F.gelu(pre), W2, b2)
    return out, (pre.to(acc_dtype(E.dtype)) if save else None)


def hypernet_backward(dout, E, W1, W2, pre, needs):
    need_E, need_W1, need_b1, need_W2, need_b2 = needs
    acc = pre.dtype
    d = dout.to(acc)
    out: List[Optional[Tensor]] = [None] * 5
    if need_W2:
        out[3] = (d.t() @ F.gelu(pre)).to(W2.dtype)
    if need_b2:
        out[4] = d.sum(0).to(W2.dtype)
    if need_E or need_W1 or need_b1:
        dz = (d @ W2.to(acc)) * gelu_grad(pre)
        if need_E:
            out[0] = (dz @ W1.to(acc)).to(E.dtype)
        if need_W1:
            out[1] = (dz.t() @ E.to(acc)).to(W1.dtype)
        if need_b1:
            out[2] = dz.sum(0).to(W1.dtype)
    return list(out)


def dora_scale_forward(z, g, bias):
    """y = g⊙z + b, in place on z (the adapter's own [M, N] output, which nothing else holds)."""
    if bias is None:
        return z.mul_(g)
    return torch.addcmul(bias, z, g, out=z)


def dora_scale_backward(dy, saved, g, bias, from_output, need_g, need_dz=True):
    """dz = dy⊙g (None unless ``need_dz``); dg = Σ_m dy⊙z with z = saved, or (y − b)/g from the output
    y, in g's dtype. The reduction accumulates in fp32 (fp64 stays fp64). Without dz, g may be wider
    than dy (DoRA's folded route passes an fp32 m itself; every backend takes that)."""
    if need_dz and g.dtype != dy.dtype:  # dz would come out in g's dtype (the other backends raise too)
        raise TypeError(f"torch backend: dora_scale_backward with dz needs g in dy's dtype {dy.dtype}, got {g.dtype}")
    dz = dy * g if need_dz else None
    dg = None
    if need_g:
        # Each op is a launch on a GPU, where DoRA steps are bound by launching them. bf16 (fp32's
        # range) multiplies in its own dtype, each product rounded once (2⁻⁹, as PEFT's bf16 DoRA
        # rounds), and the sum accumulates in fp32: two launches and a [M, N] bf16 temporary, where
        # converting dy first costs a third launch and two fp32 ones. Not with a bias read out of
        # y (Σ dy⊙y − b·Σ dy cancels where b dominates y, and would magnify those roundings), nor
        # in fp16, whose products of small gradients would fall below its range.
        acc = acc_dtype(dy.dtype)
        d = dy if dy.dtype == torch.bfloat16 and not (from_output and bias is not None) else dy.to(acc)
        dg = torch.sum(d * saved, 0, dtype=acc)
        if from_output:
            if bias is not None:
                dg.sub_(torch.sum(d, 0, dtype=acc) * bias)
            dg = torch.div(dg, g, out=torch.empty_like(g))  # in fp32, written in g's dtype: one launch
        else:
            dg = dg.to(g.dtype)
    return dz, dg


KERNELS = register("torch", {
    "adapter_forward": adapter_forward, "adapter_backward": adapter_backward,
    "shrink_forward": shrink_forward, "shrink_backward": shrink_backward,
    "expand_forward": expand_forward, "expand_backward": expand_backward,
    "hypernet_forward": hypernet_forward, "hypernet_backward": hypernet_backward,
    "dora_scale_forward": dora_scale_forward, "dora_scale_backward": dora_scale_backward,
})


def dropout_mask(seed: Tensor, M: int, K: int, p: float, like: Tensor) -> Tensor:
    """The mask the kernels above apply for a call with ``seed``: keep [M, K] in {0, 1}, like ``like``."""
    return keep_mask(seed, (M, K), p, like.device, like.dtype)


# AdaLoRA's step ops for tensors on any device: foreach updates and one bmm per group of equal shapes
STEP = StepOps(update_importance=importance.update_torch_, gram_distances=importance.gram_distances_batched)

BACKEND = Backend.of("torch", ("cpu", "cuda", "mps", "xpu", "meta"), KERNELS, dropout_mask=dropout_mask, step=STEP)
