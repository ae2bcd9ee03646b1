"""Plain-torch reference ops: the truth every backend is tested against.

Everything here is written for clarity, uses only differentiable torch ops and lets
autograd produce the gradients. No backend may be "more right" than this file.

Shapes (Linear layout, as ``nn.Linear`` stores them):
    x      [..., K]          input
    weight [N, K]            frozen base weight W0
    bias   [N] or None
    A      [r, K]            down-projection
    B      [N, r]            up-projection
    u      [r] or None       Λu (None means the identity, i.e. u = 1 frozen)
    v      [N] or None       Λv (None means the identity)
    scale  float             s = α / r
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def adapter(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    u: Optional[Tensor],
    v: Optional[Tensor],
    scale: float,
) -> Tensor:
    """y = W0·x (+ bias) + s·(v ⊙ (B·(u ⊙ (A·x)))) — Tied-LoRA eq. (1)."""
    return expand(x, weight, bias, shrink(x, A, u), B, v, scale)


def dropped(x: Tensor, keep: Tensor, p: float) -> Tensor:
    """D(x) = x ⊙ keep / (1 - p): inverted dropout with a given mask (keep in {0, 1}, x's shape)."""
    return x * keep / (1.0 - p)


def adapter_with_dropout(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, u: Optional[Tensor],
                         v: Optional[Tensor], scale: float, keep: Tensor, p: float) -> Tensor:
    """y = W0·x (+ bias) + s·(v ⊙ (B·(u ⊙ (A·D(x))))): dropout on the adapter's input only (PEFT's lora_dropout)."""
    return expand(x, weight, bias, shrink(dropped(x, keep, p), A, u), B, v, scale)


def shrink(x: Tensor, A: Tensor, u: Optional[Tensor]) -> Tensor:
    """hu = u ⊙ (A·x): the rank-r hidden state. In the joint-QKV form one hu serves q, k and v."""
    h = F.linear(x, A)
    return h if u is None else h * u


def expand(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    hu: Tensor,
    B: Tensor,
    v: Optional[Tensor],
    scale: float,
) -> Tensor:
    """y = W0·x (+ bias) + s·(v ⊙ (B·hu))."""
    z = F.linear(hu, B)
    if v is not None:
        z = z * v
    return F.linear(x, weight, bias) + scale * z


def delta_weight(A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor], scale: float) -> Tensor:
    """ΔW = s·Λv·B·Λu·A, shape [N, K]. Used by merge() and by export."""
    Bv = B if v is None else B * v[:, None]
    Au = A if u is None else A * u[:, None]
    return scale * (Bv @ Au)


def dora_norm(weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor], scale: float) -> Tensor:
    """‖W0 + ΔW‖ per output row [N], dense (what PEFT computes), detached: DoRA §4.3 treats it as a constant."""
    return torch.linalg.vector_norm(weight + delta_weight(A, B, u, v, scale), dim=1).detach()


def dora_adapter(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, u: Optional[Tensor],
                 v: Optional[Tensor], scale: float, magnitude: Tensor, keep: Optional[Tensor] = None,
                 p: float = 0.0) -> Tensor:
    """DoRA (Liu et al. 2024, eq. 5 with §4.3's detached norm) as PEFT 0.21 computes it:

        y = W0·x + b + (g − 1)⊙(W0·D(x)) + g⊙(ΔW·D(x)),   g = m / ‖W0 + ΔW‖_row,  ΔW = s·Λv·B·Λu·A

    which without dropout is y = g⊙(W0·x + ΔW·x) + b. ``keep`` is the dropout mask of D
    (x's shape, {0, 1}) with probability ``p``; None means no dropout."""
    delta = delta_weight(A, B, u, v, scale)
    g = magnitude / dora_norm(weight, A, B, u, v, scale)
    xd = x if keep is None else dropped(x, keep, p)
    return F.linear(x, weight, bias) + (g - 1) * F.linear(xd, weight) + g * F.linear(xd, delta)


def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
                    offset: Optional[Tensor], blocksize: int, blocksize2: int, N: int, K: int) -> Tensor:
    """W0 [N, K] fp32 of a bitsandbytes 4-bit weight (QLoRA, Dettmers et al. 2023, §2-3): flat element i is
    code[nibble i]·absmax[i // blocksize], element 2j in the high nibble of byte j; with double
    quantization absmax = code2[absmax]·absmax2[j // blocksize2] + offset."""
    b = packed.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)[:N * K]
    if absmax2 is not None:
        scales = (code2.float()[absmax.long()] * absmax2.float().repeat_interleave(blocksize2)[:absmax.numel()]
                  + offset.float())
    else:
        scales = absmax.float()
    return (code.float()[nibbles] * scales.repeat_interleave(blocksize)[:N * K]).reshape(N, K)


def adapter_4bit(x: Tensor, w4: tuple, bias: Optional[Tensor], A: Tensor, B: Tensor, u: Optional[Tensor],
                 v: Optional[Tensor], scale: float) -> Tensor:
    """``adapter`` over a bitsandbytes 4-bit W0 given as its state w4 (``functions.adapter_4bit``), the base
    product as bitsandbytes 0.50's ``matmul_4bit`` computes it: W0, x and the bias in the layer's compute
    dtype (None: x's), the result back in x's; its backward reads W0 rounded to the dtype it was
    quantized from first (its ``dequantize_4bit``), then to the gradient's. The low-rank term in x's dtype."""
    *state, compute_dtype, weight_dtype = w4
    compute = compute_dtype or x.dtype
    W = dequantize_4bit(*state, B.shape[0], A.shape[1])
    forward, backward = W.to(compute), W.to(weight_dtype).to(compute)
    xc, b = x.to(compute), None if bias is None else bias.to(compute)
    # the forward's value with the backward's gradient (the two weights are equal unless weight_dtype is
    # narrower than the compute dtype)
    base = F.linear(xc, backward, b) + (F.linear(xc, forward, b) - F.linear(xc, backward, b)).detach()
    return base.to(x.dtype) + expand(x, torch.zeros_like(W, dtype=x.dtype), None, shrink(x, A, u), B, v, scale)


def hypernet(E: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor) -> Tensor:
    """LEFT's γ for every layer at once: GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 → [L, P]."""
    return F.linear(F.gelu(F.linear(E, W1, b1)), W2, b2)
