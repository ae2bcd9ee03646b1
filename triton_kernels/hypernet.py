"""Hypernetwork generation: out = GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 → [L, P] for all L layers
in one launch (LEFT's γ; the PG methods' factors).

Forward: grid over (P blocks, L blocks). Each program recomputes the tiny hidden
activation H = GeLU(Z), Z = E·W1ᵀ + b1 [L, h2], chunk by chunk over h2, and multiplies
it into its P columns; the programs of the first P block also store Z for backward.
GeLU is the exact erf form, as ``torch.nn.functional.gelu`` by default.

Backward: one main launch over P blocks gives dW2 = dOutᵀ·H and db2 = Σ_L dOut (complete
per P block), and adds its P block's share of dH = dOut·W2 [L, h2] with fp32 atomics.
The tail (dZ = dH⊙GeLU'(Z), dW1 = dZᵀ·E, db1 = Σ_L dZ, dE = dZ·W1) is plain torch on
[L, h2]-sized tensors: a handful of tiny ops, not worth a second kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

Tensor = torch.Tensor

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def gelu_grad(z: Tensor) -> Tensor:
    """d/dz of z·Φ(z) = Φ(z) + z·φ(z) (exact erf GeLU), for the backward's [L, h2] tail. Written here
    rather than imported so that this package depends on torch and triton alone."""
    return 0.5 * (1.0 + torch.erf(z * _SQRT1_2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI

@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _hypernet_fwd_kernel(
    e_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, z_ptr, out_ptr,
    L, H_IN, H2, P,
    sel, sek, sw1h, sw1k, sw2p, sw2h, szl, szh, sol, sop,
    STORE_Z: tl.constexpr, DOT_DT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    l_ok = ls < L
    p_ok = ps < P
    acc = tl.zeros((BLOCK_L, BLOCK_P), dtype=ACC_DT)
    for c0 in range(0, H2, BLOCK_H):
        cs = c0 + tl.arange(0, BLOCK_H)
        c_ok = cs < H2
        z = tl.zeros((BLOCK_L, BLOCK_H), dtype=ACC_DT)
        for k0 in range(0, H_IN, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H_IN
            e = tl.load(e_ptr + ls[:, None] * sel + ks[None, :] * sek, mask=l_ok[:, None] & k_ok[None, :], other=0.0)
            w1t = tl.load(w1_ptr + cs[None, :] * sw1h + ks[:, None] * sw1k, mask=k_ok[:, None] & c_ok[None, :],
                          other=0.0)
            z = tl.dot(e.to(DOT_DT), w1t.to(DOT_DT), z, input_precision=PREC, out_dtype=ACC_DT)
        # Padded h2 columns get Z = 0 and GeLU(0) = 0, so they add nothing below.
        z += tl.load(b1_ptr + cs, mask=c_ok, other=0.0).to(ACC_DT)[None, :]
        if STORE_Z:
            if pid_p == 0:
                tl.store(z_ptr + ls[:, None] * szl + cs[None, :] * szh, z.to(z_ptr.dtype.element_ty),
                         mask=l_ok[:, None] & c_ok[None, :])
        w2t = tl.load(w2_ptr + ps[None, :] * sw2p + cs[:, None] * sw2h, mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        acc = tl.dot(_gelu(z).to(DOT_DT), w2t.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC_DT)
    acc += tl.load(b2_ptr + ps, mask=p_ok, other=0.0).to(ACC_DT)[None, :]
    tl.store(out_ptr + ls[:, None] * sol + ps[None, :] * sop, acc.to(out_ptr.dtype.element_ty),
             mask=l_ok[:, None] & p_ok[None, :])


@triton.jit
def _hypernet_bwd_kernel(
    g_ptr, z_ptr, w2_ptr, dw2_ptr, db2_ptr, dh_ptr,
    L, H2, P,
    sgl, sgp, szl, szh, sw2p, sw2h, sdw2p, sdw2h, sdhl, sdhh,
    COMPUTE_DW2: tl.constexpr, COMPUTE_DB2: tl.constexpr, COMPUTE_DH: tl.constexpr,
    DOT_DT: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
):
    ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < P
    if COMPUTE_DB2:
        db2 = tl.zeros((BLOCK_P,), dtype=ACC_DT)
        for l0 in range(0, L, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            g = tl.load(g_ptr + ls[:, None] * sgl + ps[None, :] * sgp, mask=(ls < L)[:, None] & p_ok[None, :], other=0.0)
            db2 += tl.sum(g.to(ACC_DT), axis=0)
        tl.store(db2_ptr + ps, db2.to(db2_ptr.dtype.element_ty), mask=p_ok)
    if COMPUTE_DW2 or COMPUTE_DH:
        for c0 in range(0, H2, BLOCK_H):
            cs = c0 + tl.arange(0, BLOCK_H)
            c_ok = cs < H2
            w2 = tl.load(w2_ptr + ps[:, None] * sw2p + cs[None, :] * sw2h, mask=p_ok[:, None] & c_ok[None, :],
                         other=0.0).to(DOT_DT)
            dw2 = tl.zeros((BLOCK_P, BLOCK_H), dtype=ACC_DT)
            for l0 in range(0, L, BLOCK_L):
                ls = l0 + tl.arange(0, BLOCK_L)
                l_ok = ls < L
                g = tl.load(g_ptr + ls[:, None] * sgl + ps[None, :] * sgp, mask=l_ok[:, None] & p_ok[None, :],
                            other=0.0).to(DOT_DT)
                if COMPUTE_DW2:
                    z = tl.load(z_ptr + ls[:, None] * szl + cs[None, :] * szh, mask=l_ok[:, None] & c_ok[None, :],
                                other=0.0).to(ACC_DT)
                    dw2 = tl.dot(tl.trans(g), _gelu(z).to(DOT_DT), dw2, input_precision=PREC, out_dtype=ACC_DT)
                if COMPUTE_DH:
                    part = tl.dot(g, w2, input_precision=PREC, out_dtype=ACC_DT)
                    tl.atomic_add(dh_ptr + ls[:, None] * sdhl + cs[None, :] * sdhh, part.to(dh_ptr.dtype.element_ty),
                                  mask=l_ok[:, None] & c_ok[None, :])
            if COMPUTE_DW2:
                tl.store(dw2_ptr + ps[:, None] * sdw2p + cs[None, :] * sdw2h, dw2.to(dw2_ptr.dtype.element_ty),
                         mask=p_ok[:, None] & c_ok[None, :])


# Fixed L/h2 chunks: L (layers) and h2 (hypernetwork width) are small, P is the long axis.
_FWD = _launch.Launcher(
    _hypernet_fwd_kernel, "hypernet_fwd",
    _launch.configs([(32, 64, 32, 32, 4, 3), (32, 128, 32, 32, 4, 3), (32, 256, 32, 32, 8, 3),
                     (64, 128, 32, 32, 4, 3)], ("BLOCK_L", "BLOCK_P", "BLOCK_H", "BLOCK_K")),
    key=("L", "H_IN", "H2", "P"),
    fallback={"BLOCK_L": 16, "BLOCK_P": 32, "BLOCK_H": 16, "BLOCK_K": 16},
)
_BWD = _launch.Launcher(
    _hypernet_bwd_kernel, "hypernet_bwd",
    _launch.configs([(32, 64, 32, 4, 3), (32, 128, 32, 4, 3), (32, 256, 32, 8, 3), (64, 128, 32, 4, 3)],
                    ("BLOCK_L", "BLOCK_P", "BLOCK_H")),
    key=("L", "H2", "P", "COMPUTE_DW2", "COMPUTE_DH"),
    fallback={"BLOCK_L": 16, "BLOCK_P": 32, "BLOCK_H": 16},
    reset_to_zero=("dh_ptr",),
)


def hypernet_forward(E: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, save: bool):
    """(out [L, P], Z = E·W1ᵀ + b1 [L, h2] in the accumulation dtype if ``save`` else empty)."""
    _launch.check_same_dtype("E", E, W1=W1, b1=b1, W2=W2, b2=b2)
    L, H_IN = E.shape
    H2, P = W1.shape[0], W2.shape[0]
    b1 = b1 if b1 is not None else E.new_zeros(H2)  # the kernel always adds a bias
    b2 = b2 if b2 is not None else E.new_zeros(P)
    out = torch.empty(L, P, device=E.device, dtype=E.dtype)
    z = torch.empty(L, H2, device=E.device, dtype=_launch.acc_torch_dtype(E.dtype)) if save else None
    _FWD(lambda meta: (triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(L, meta["BLOCK_L"])),
         E, W1, _launch.vec(b1), W2, _launch.vec(b2), z if save else _launch.unused(E), out, L, H_IN, H2, P,
         *_launch.strides(E), *_launch.strides(W1), *_launch.strides(W2), *_launch.strides(z), *_launch.strides(out),
         STORE_Z=save, **_launch.dot_meta(E.dtype))
    return out, (z if save else None)


def hypernet_backward(g: Tensor, E: Tensor, W1: Tensor, W2: Tensor, z: Tensor, needs):
    """(dE, dW1, db1, dW2, db2): the main kernel gives dW2, db2 and dH = dOut·W2; the [L, h2] tail is torch."""
    need_E, need_W1, need_b1, need_W2, need_b2 = needs
    L, P, H2 = E.shape[0], W2.shape[0], W1.shape[0]
    acc = z.dtype
    need_dh = need_E or need_W1 or need_b1
    dW2 = torch.empty_like(W2) if need_W2 else None
    db2 = torch.empty(P, device=g.device, dtype=W2.dtype) if need_b2 else None
    dh = torch.zeros(L, H2, device=g.device, dtype=acc) if need_dh else None
    _BWD(lambda meta: (triton.cdiv(P, meta["BLOCK_P"]),),
         g, z, W2, dW2 if need_W2 else _launch.unused(g), db2 if need_b2 else _launch.unused(g),
         dh if need_dh else _launch.unused(g, acc),
         L, H2, P, *_launch.strides(g), *_launch.strides(z), *_launch.strides(W2), *_launch.strides(dW2),
         *_launch.strides(dh),
         COMPUTE_DW2=need_W2, COMPUTE_DB2=need_b2, COMPUTE_DH=need_dh, **_launch.dot_meta(g.dtype))
    dE = dW1 = db1 = None
    if need_dh:  # the [L, h2] tail in torch
        dz = dh * gelu_grad(z)
        if need_E:
            dE = (dz @ W1.to(acc)).to(E.dtype)
        if need_W1:
            dW1 = (dz.t() @ E.to(acc)).to(W1.dtype)
        if need_b1:
            db1 = dz.sum(0).to(W1.dtype)
    return [t if t is not None else None for t in (dE, dW1, db1, dW2, db2)]
