"""A bitsandbytes 4-bit weight (NF4 / FP4, QLoRA) read tile by tile inside a GEMM, never dequantized whole.

bitsandbytes' layout (``bitsandbytes.functional.quantize_4bit``): W0 [N, K] flattened row-major,
two 4-bit codes per byte (element 2i in the high nibble of byte i, 2i+1 in the low one), a
16-entry code book (the NF4 or FP4 values), and one fp32 absmax per ``blocksize`` consecutive
elements:  W0[n, k] = code[nibble(n·K + k)] · absmax[(n·K + k) // blocksize].
With double quantization ("nested") the absmax are themselves 8-bit:
absmax[j] = code2[absmax_q[j]] · absmax2[j // blocksize2] + offset.

``dequant_tile`` computes that for a tile of flat indices, in fp32 (bitsandbytes' own
dequantization is fp32, then cast); ``Weight4bit`` is what a launcher passes for a weight,
with a logical shape and element strides over W0, so that ``.t()`` is W0ᵀ, as the backward's
dx = dy·W0 needs, and the two dtypes bitsandbytes' own product rounds through: ``dtype``, the
one W0 was quantized from (what ``dequantize_4bit`` returns), and ``compute_dtype``, the layer's
(None: the input's, as bitsandbytes' ``Linear4bit`` before its first forward).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@dataclass(frozen=True)
class Weight4bit:
    """A 4-bit W0 as a logical 2-D operand: ``shape`` and element ``strides`` over W0's row-major order."""

    packed: Tensor  # uint8, ceil(N·K / 2) bytes (any storage dtype, viewed as uint8)
    absmax: Tensor  # fp32 [blocks], or uint8 [blocks] when nested
    code: Tensor  # fp32 [16]
    absmax2: Optional[Tensor]  # fp32 [blocks / blocksize2] (nested only)
    code2: Optional[Tensor]  # fp32 [256] (nested only)
    offset: Optional[Tensor]  # fp32 [1] (nested only)
    blocksize: int
    blocksize2: int
    shape: Tuple[int, int]
    strides: Tuple[int, int]
    dtype: torch.dtype = torch.float32  # W0's dtype before quantization (bitsandbytes' quant_state.dtype)
    compute_dtype: Optional[torch.dtype] = None  # the layer's; None: the input's

    @classmethod
    def of(cls, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, N: int, K: int,
           dtype: torch.dtype = torch.float32, compute_dtype: Optional[torch.dtype] = None) -> "Weight4bit":
        """W0 [N, K] itself."""
        return cls(packed.view(torch.uint8).reshape(-1), absmax, code, absmax2, code2, offset, int(blocksize),
                   int(blocksize2), (N, K), (K, 1), dtype, compute_dtype)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def t(self) -> "Weight4bit":
        return replace(self, shape=self.shape[::-1], strides=self.strides[::-1])


@triton.jit
def dequant_tile(q_ptr, abs_ptr, code_ptr, abs2_ptr, code2_ptr, offset_ptr, flat, mask, QBLOCK: tl.constexpr,
                 QBLOCK2: tl.constexpr, NESTED: tl.constexpr):
    """W0's elements at the int64 flat indices ``flat`` (any tile shape), fp32; 0 where ``mask`` is off.

    The block sizes are compile-time constants (bitsandbytes' are powers of two, a few values per
    model): the two block indices per element are then shifts, where a run-time int64 division is
    a long instruction sequence on a GPU (unmeasured there: no GPU has run this change)."""
    byte = tl.load(q_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0).to(tl.float32)
    block = flat // QBLOCK
    if NESTED:
        q = tl.load(abs_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = (tl.load(code2_ptr + q, mask=mask, other=0.0).to(tl.float32)
                 * tl.load(abs2_ptr + block // QBLOCK2, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(offset_ptr).to(tl.float32))
    else:
        scale = tl.load(abs_ptr + block, mask=mask, other=0.0).to(tl.float32)
    return value * scale


__all__ = ["Weight4bit", "dequant_tile"]
