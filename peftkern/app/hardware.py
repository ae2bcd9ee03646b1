"""What the machine computes natively, asked once by every part of the application that picks a dtype."""
from __future__ import annotations

import torch


def device_type() -> str:
    """"cuda" when a CUDA device is visible, else "cpu" (where the application trains)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str) -> bool:
    """Whether ``device`` ("cuda" / "cpu") computes bf16 natively: CUDA with bf16 support; a CPU with
    AVX-512 BF16 or AMX (elsewhere torch emulates bf16, slower than fp32)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


__all__ = ["device_type", "native_bf16"]
