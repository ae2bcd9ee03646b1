"""The "torch" backend: the kernels of ``backend.py`` as a few ATen calls each (cuBLAS on CUDA).

It is the default on CUDA until the Triton kernels pass the GPU suite (dispatch.py), so
it is written for few launches and no M×N temporaries. Every diagonal scaling is folded
into the rank-r factors, never applied to an M×N or M×K tensor:

    forward   h  = D(x)·Aᵀ                         [M, r]   (saved when a gradient reads it)
              y  = x·W0ᵀ + b;  y += s·h·((v⊙B)⊙u)ᵀ          (one in-place addmm)
    backward  Gt  = dyᵀ·(h⊙u)              [N, r]  → dB = s·v⊙Gt,  dv = s·Σ_j B⊙Gt
              dhu = dy·(s·v⊙B)             [M, r]  → du = Σ_m h⊙dhu,  dh = u⊙dhu
              dA  = dhᵀ·D(x);  dx = dy·W0 + D'(dh·A)        (one in-place addmm without dropout)

dv is an M×N reduction in the reference (Σ_m dy ⊙ (B·hu)); the identity
Σ_m dy[m,n]·Σ_j hu[m,j]·B[n,j] = Σ_j B[n,j]·Gt[n,j] makes it free once dB's GEMM is done.
For LoRA (u, v identity, no bias, no dropout) that is 3 launches forward and 7 backward.

Dropout D: ``keep_mask(seed, ...)`` is a Bernoulli(1-p) draw from a private generator
seeded with the call's seed (torch.Generator on x's device), so the backward redraws the
same mask instead of storing it; 1/(1-p) is folded into h and dh.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .backend import Backend
from .library import acc_dtype, register

Tensor = torch.Tensor


def keep_mask(seed: Tensor, shape, p: float, device, dtype) -> Tensor:
    """This backend's dropout mask: 1 where an element is kept, 0 where dropped (Bernoulli(1-p))."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


def _dropped(x: Tensor, dropout: float, seed: Tensor) -> Tensor:
    """D(x) without the 1/(1-p) factor (folded into h by the callers)."""
    if not dropout:
        return x
    return x * keep_mask(seed, x.shape, dropout, x.device, x.dtype)


def _fold(B: Tensor, u: Optional[Tensor], v: Optional[Tensor]) -> Tensor:
    """(v⊙B)⊙u [N, r]: B itself when both are the identity."""
    if v is not None:
        B = B * v[:, None]
    if u is not None:
        B = B * u
    return B


def _base(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()


def adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h):
    h = _dropped(x, dropout, seed) @ A.t()
    if dropout:
        h.mul_(1.0 / (1.0 - dropout))
    y = _base(x, weight, bias)
    y.addmm_(h, _fold(B, u, v).t(), alpha=scale)
    return y, (h if save_h else None), None


def _lowrank_backward(dy, x, A, B, u, v, h, scale, dropout, seed, need_x, need_A, need_u, need_B, need_v, dx):
    """The rank-r part of the adapter's backward. Adds the low-rank term into ``dx`` in place."""
    dA = dB = du = dv = None
    if need_B or need_v:
        gt = dy.t() @ (h if u is None else h * u)  # [N, r]: shared by dB and dv
        if need_B:
            dB = (gt * scale if v is None else gt * (scale * v)[:, None]).to(B.dtype)
        if need_v:
            dv = (gt * B).sum(1).mul_(scale).to(v.dtype)
    if need_x or need_A or need_u:
        dhu = dy @ (B * scale if v is None else B * (scale * v)[:, None])
        if need_u:
            du = (dhu * h).sum(0).to(u.dtype)
        dh = dhu if u is None else dhu * u
        if dropout:
            dh = dh * (1.0 / (1.0 - dropout))
            keep = keep_mask(seed, (dy.shape[0], A.shape[1]), dropout, dy.device, dy.dtype)
            if need_A:
                dA = (dh.t() @ (x * keep)).to(A.dtype)
            if need_x:
                dx.addcmul_(dh @ A, keep)
        else:
            if need_A:
                dA = (dh.t() @ x).to(A.dtype)
            if need_x:
                dx.addmm_(dh, A)
    return dA, dB, du, dv


def adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, seed, needs):
    need_x, need_w, need_b, need_A, need_B, need_u, need_v = needs
    dx = dy @ weight if need_x else None
    dA, dB, du, dv = _lowrank_backward(dy, x, A, B, u, v, h, scale, dropout, seed, need_x, need_A, need_u,
                                       need_B, need_v, dx)
    dw = (dy.t() @ x) if need_w else None
    db = dy.sum(0).to(weight.dtype) if need_b else None
    return [dx, dw, db, dA, dB, du, dv]


def shrink_forward(x, A, u, dropout, seed, save_h):
    h = _dropped(x, dropout, seed) @ A.t()
    if dropout:
        h.mul_(1.0 / (1.0 - dropout))
    if u is None:
        return h, None
    return h * u, (h if save_h else None)


def shrink_backward(dhu, x, A, u, h, dropout, seed, needs):
    need_x, need_A, need_u = needs
    du = (dhu * h).sum(0).to(u.dtype) if need_u else None
    dx = dA = None
    if need_x or need_A:
        dh = dhu if u is None else dhu * u
        keep = None
        if dropout:
            dh = dh * (1.0 / (1.0 - dropout))
            keep = keep_mask(seed, (dhu.shape[0], A.shape[1]), dropout, dhu.device, dhu.dtype)
        if need_A:
            dA = (dh.t() @ (x if keep is None else x * keep)).to(A.dtype)
        if need_x:
            dx = dh @ A.to(dh.dtype)
            if keep is not None:
                dx.mul_(keep)
    return [dx, dA, du]


def expand_forward(x, weight, bias, hu, B, v, scale):
    y = _base(x, weight, bias)
    return y.addmm_(hu, _fold(B, None, v).t(), alpha=scale)


def expand_backward(dy, x, weight, hu, B, v, scale, needs):
    need_x, need_w, need_b, need_hu, need_B, need_v = needs
    dx = dy @ weight if need_x else None
    dhu = dB = dv = None
    if need_hu:
        dhu = (dy @ (B * scale if v is None else B * (scale * v)[:, None])).to(hu.dtype)
    if need_B or need_v:
        gt = dy.t() @ hu
        if need_B:
            dB = (gt * scale if v is None else gt * (scale * v)[:, None]).to(B.dtype)
        if need_v:
            dv = (gt * B).sum(1).mul_(scale).to(v.dtype)
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


KERNELS = register("torch", {
    "adapter_forward": adapter_forward, "adapter_backward": adapter_backward,
    "shrink_forward": shrink_forward, "shrink_backward": shrink_backward,
    "expand_forward": expand_forward, "expand_backward": expand_backward,
    "hypernet_forward": hypernet_forward, "hypernet_backward": hypernet_backward,
})

def dropout_mask(seed: Tensor, M: int, K: int, p: float, like: Tensor) -> Tensor:
    """The mask the kernels above apply for a call with ``seed``: keep [M, K] in {0, 1}, like ``like``."""
    return keep_mask(seed, (M, K), p, like.device, like.dtype)


BACKEND = Backend.of("torch", ("cpu", "cuda", "mps", "xpu", "meta"), KERNELS, dropout_mask=dropout_mask)
