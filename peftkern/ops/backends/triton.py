"""The "triton" backend: the kernels of ``backend.py``'s contract, composed from the launches of the
stand-alone Triton package (``peftkern_triton``, the repository's triton_kernels/ folder).

Dataflow (the torch kernels', on Triton):

    forward   h = D(x)·Aᵀ [M, r];  y = x·W0ᵀ + b + h·(s·u⊙v⊙B)ᵀ     1 GEMM (+1 skinny shrink, prior_shrink)
    backward  dy_pass:  dh = u⊙(dy·(s·v⊙B)),  Gt = dyᵀ·(h⊙u),  du     1 pass over dy
              dx = dy·W0 + D'(dh·A)                                  1 GEMM, low-rank term in the epilogue
              dA = dhᵀ·D(x)                                          1 skinny pass over x
              dB = s·v⊙Gt,  dv = s·Σ_j B⊙Gt                          [N, r] torch ops
    4-bit W0  the same launches, W0's tiles dequantized in the GEMMs' K-loops (QLoRA fused; the
              optional adapter_4bit kernels of the contract)

Forward variant (``with forward_variant(name):``, for the calls inside the block):
  "prior_shrink" (default): a skinny shrink kernel writes h, the GEMM reads it in its
      epilogue. Costs one extra read of x (M·K elements) and a launch.
  "in_loop": h = D(x)·Aᵀ accumulates inside the GEMM's K-loop from the x tile already
      loaded. No extra pass over x, but every N-block recomputes it: extra tensor-core
      work of BLOCK_R/BLOCK_N of the base GEMM (r is padded to >= 16 for tl.dot).
``benchmarks/bench_triton_layer.py`` times both.

The whole rank lives in one tile, so the backend declares ``max_rank`` (128): the registry
gives modules of larger ranks to the torch backend and explain() says so.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from peftkern_triton import _launch
from peftkern_triton.adapter_backward import dy_pass, grad_a, grads_from_gt, up_factor
from peftkern_triton.adapter_forward import lowrank_gemm
from peftkern_triton.dora import scale_backward as dora_scale_backward
from peftkern_triton.dora import scale_forward as dora_scale_forward
from peftkern_triton.hypernet import hypernet_backward, hypernet_forward
from peftkern_triton.shrink import dropout_mask
from peftkern_triton.shrink import shrink_forward as _shrink
from peftkern_triton.weight4bit import Weight4bit

from ..backend import Backend
from ..library import register

Tensor = torch.Tensor

FORWARD_VARIANTS = ("prior_shrink", "in_loop")
_VARIANT: contextvars.ContextVar = contextvars.ContextVar("peftkern_triton_forward", default="prior_shrink")


@contextlib.contextmanager
def forward_variant(name: str) -> Iterator[None]:
    """How the forwards inside the block get h = D(x)·Aᵀ (module docstring). Raises ValueError
    naming the choices for an unknown variant."""
    if name not in FORWARD_VARIANTS:
        raise ValueError(f"unknown forward variant {name!r}; valid choices: {', '.join(FORWARD_VARIANTS)}")
    token = _VARIANT.set(name)
    try:
        yield
    finally:
        _VARIANT.reset(token)


def current_forward_variant() -> str:
    return _VARIANT.get()


def adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h):
    """``weight``: W0 [N, K], None (the low-rank term alone), or a ``Weight4bit`` (adapter_4bit_forward)."""
    dense = weight if isinstance(weight, torch.Tensor) else None
    # a 4-bit W0's bias is in the layer's compute dtype (adapter_4bit_forward checks it)
    _launch.check_same_dtype("x", x, weight=dense, bias=None if isinstance(weight, Weight4bit) else bias, A=A, B=B,
                             u=u, v=v)
    f = up_factor(B, u, v, scale, _launch.acc_torch_dtype(x.dtype))
    s = int(seed)
    if weight is None:  # the low-rank term alone (a quantized base runs elsewhere)
        h, _ = _shrink(x, A, None, dropout=dropout, seed=s)
        y, _ = lowrank_gemm(None, None, bias, h, f, out_dtype=x.dtype)
        return y, (h if save_h else None), None
    if _VARIANT.get() == "in_loop":
        y, h = lowrank_gemm(x, weight, bias, None, f, a=A, store_h=save_h, out_dtype=x.dtype, dropout=dropout,
                            seed=s)
    else:
        h, _ = _shrink(x, A, None, dropout=dropout, seed=s)
        y, _ = lowrank_gemm(x, weight, bias, h, f, out_dtype=x.dtype)
    return y, (h if save_h and h is not None else None), None


def adapter_4bit_forward(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, compute_dtype,
                         weight_dtype, bias, A, B, u, v, scale, dropout, seed, save_h):
    """The adapter over a 4-bit W0 (QLoRA fused): W0's tiles dequantized in the GEMM's K-loop, the base
    product rounded as bitsandbytes' (the bias given in the compute dtype, as bitsandbytes adds it)."""
    _launch.check_same_dtype("x", x, A=A, B=B, u=u, v=v)
    if bias is not None:
        _launch.check_same_dtype("the compute dtype's bias", torch.empty(0, dtype=compute_dtype or x.dtype), bias=bias)
    # bitsandbytes 0.50's forward (its gemm_4bit) dequantizes straight to the compute dtype; its backward
    # (dequantize_4bit) goes through the dtype W0 was quantized from
    w4 = Weight4bit.of(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, B.shape[0], x.shape[1],
                       compute_dtype or x.dtype, compute_dtype)
    y, h, _ = adapter_forward(x, w4, bias, A, B, u, v, scale, dropout, seed, save_h)
    return y, h


def adapter_4bit_backward(dy, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, compute_dtype,
                          weight_dtype, A, B, u, v, h, scale, dropout, seed, needs):
    need_x, need_A, need_B, need_u, need_v = needs
    w4 = Weight4bit.of(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, B.shape[0], A.shape[1],
                       weight_dtype, compute_dtype)
    dx, _, _, dA, dB, du, dv = adapter_backward(dy, x, w4, A, B, u, v, h, None, scale, dropout, seed,
                                                [need_x, False, False, need_A, need_B, need_u, need_v])
    return [dx, dA, dB, du, dv]


def adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, seed, needs):
    need_x, need_w, need_b, need_A, need_B, need_u, need_v = needs
    s = int(seed)
    dx = dw = db = dA = dB = du = dv = None
    need_dh = need_x or need_A
    if need_dh or need_B or need_u or need_v:
        fv = up_factor(B, None, v, scale, _launch.acc_torch_dtype(dy.dtype))
        dh, gt, du = dy_pass(dy, fv, h, u, compute_dh=need_dh, compute_gt=need_B or need_v, compute_du=need_u)
        dB, dv = grads_from_gt(gt, B, v, scale, need_B, need_v)
        if du is not None:
            du = du.to(u.dtype)
        if need_A:
            dA = grad_a(dh, x, out_dtype=A.dtype, dropout=dropout, seed=s)
        if need_x:
            base = (dy, weight.t()) if weight is not None else (None, None)
            dx, _ = lowrank_gemm(*base, None, dh, A.t(), out_dtype=dy.dtype, dropout=dropout, seed=s,
                                 mask_lowrank=True)
    # An unfrozen base layer is off the fused path on purpose: plain ATen products.
    if need_w:
        dw = dy.t() @ x
    if need_b:
        db = dy.sum(0).to(dy.dtype if weight is None else weight.dtype)
    return [dx, dw, db, dA, dB, du, dv]


def shrink_forward(x, A, u, dropout, seed, save_h):
    _launch.check_same_dtype("x", x, A=A, u=u)
    h, hu = _shrink(x, A, u, store_h=save_h, dropout=dropout, seed=int(seed))
    if hu is None:
        return h, None
    return hu, (h if save_h else None)


def shrink_backward(dhu, x, A, u, h, dropout, seed, needs):
    need_x, need_A, need_u = needs
    # The tail is M×r elementwise work: plain torch ops, no M×K or M×N temporary.
    du = (dhu * h).sum(0).to(u.dtype) if need_u else None
    dh = dhu if u is None else dhu * u
    dA = grad_a(dh, x, out_dtype=A.dtype, dropout=dropout, seed=int(seed)) if need_A else None
    dx = None
    if need_x:
        dx, _ = lowrank_gemm(None, None, None, dh, A.t(), out_dtype=dhu.dtype, dropout=dropout, seed=int(seed),
                             mask_lowrank=True)
    return [dx, dA, du]


def expand_forward(x, weight, bias, hu, B, v, scale):
    _launch.check_same_dtype("x", x, weight=weight, bias=bias, hu=hu, B=B, v=v)
    y, _ = lowrank_gemm(x, weight, bias, hu, up_factor(B, None, v, scale, _launch.acc_torch_dtype(x.dtype)),
                        out_dtype=x.dtype)
    return y


def expand_backward(dy, x, weight, hu, B, v, scale, needs):
    need_x, need_w, need_b, need_hu, need_B, need_v = needs
    dx = dw = db = dhu = dB = dv = None
    if need_hu or need_B or need_v:
        fv = up_factor(B, None, v, scale, _launch.acc_torch_dtype(dy.dtype))
        dhu, gt, _ = dy_pass(dy, fv, hu, None, compute_dh=need_hu, compute_gt=need_B or need_v, compute_du=False)
        dB, dv = grads_from_gt(gt, B, v, scale, need_B, need_v)
        if dhu is not None:
            dhu = dhu.to(hu.dtype)
    if need_x:  # the low-rank part of dx flows through hu into the shrink's backward
        dx, _ = lowrank_gemm(dy, weight.t(), None, None, None, out_dtype=dy.dtype)
    if need_w:
        dw = dy.t() @ x
    if need_b:
        db = dy.sum(0).to(weight.dtype)
    return [dx, dw, db, dhu, dB, dv]


def _path(N: int, K: int, r: int, dtype) -> str:
    return f"triton ({_VARIANT.get()})"


KERNELS = register("triton", {
    "adapter_forward": adapter_forward, "adapter_backward": adapter_backward,
    "shrink_forward": shrink_forward, "shrink_backward": shrink_backward,
    "expand_forward": expand_forward, "expand_backward": expand_backward,
    "hypernet_forward": hypernet_forward, "hypernet_backward": hypernet_backward,
    "dora_scale_forward": dora_scale_forward, "dora_scale_backward": dora_scale_backward,
    "adapter_4bit_forward": adapter_4bit_forward, "adapter_4bit_backward": adapter_4bit_backward,
})

# On the CPU the kernels run only under the interpreter (registry precheck, backends/__init__.py).
BACKEND = Backend.of("triton", ("cuda", "cpu"), KERNELS, path=_path, dropout_mask=dropout_mask,
                     max_rank=_launch.MAX_RANK, over_rank="torch")

launch_counts, reset_launch_counts = _launch.launch_counts, _launch.reset_launch_counts
