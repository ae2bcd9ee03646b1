"""Quantized base layers (QLoRA, Dettmers et al. 2023): bitsandbytes' 4-bit (NF4, FP4) and 8-bit Linears.

A model loaded the transformers way (``from_pretrained(..., quantization_config=
BitsAndBytesConfig(load_in_4bit=True, ...))``) keeps its targets as ``bitsandbytes.nn.Linear4bit``
(or ``Linear8bitLt``). peftkern adapts them as it adapts any Linear, with two differences:

* the frozen base product is bitsandbytes' own op (``bitsandbytes.matmul_4bit`` with the layer's
  packed weight and quantization state; the 8-bit layer's forward), and the adapter's low-rank
  term is peftkern's kernels (``weight=None``: the term alone), added to it. The base stays
  4-bit in memory: no dequantized copy is kept;
* what needs W0 itself dequantizes it on the spot and drops it: DoRA's row norms (once per
  optimizer step), merging (``unpatch(merge=True)`` dequantizes, merges in fp32 and leaves a
  full-precision Linear; ``requantize=True`` quantizes the merged weight back and reports
  each layer's error).

The base op is called directly, not through the layer's ``forward``: bitsandbytes 0.50 on a
CPU with AVX-512 BF16 repacks a 4-bit layer for its bf16 inference kernel in place at the first
eval-mode, no-grad forward, after which no gradient reaches an adapter (PEFT's neither): its
kernel has no backward. Patching turns the repacking off for every 4-bit layer of the model, the
ones not adapted included, and unpacks a layer already repacked (``keep_trainable``).

bitsandbytes is an optional dependency (``pip install peftkern[quant]``, 0.49 or newer),
imported only when a model holds such a layer.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from torch import nn

log = logging.getLogger("peftkern")

MIN_VERSION = (0, 49)
INSTALL = "pip install 'peftkern[quant]'  (bitsandbytes >= 0.49)"
KINDS = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}  # bitsandbytes' class names (and their subclasses)
DEVICES = {"4bit": ("cpu", "cuda", "xpu"), "8bit": ("cpu", "cuda", "xpu")}  # where bitsandbytes runs them


def kind(module: nn.Module) -> Optional[str]:
    """"4bit" / "8bit" for a bitsandbytes quantized Linear (without importing bitsandbytes), else None."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in KINDS:
            return KINDS[cls.__name__]
    return None


def features(module: nn.Module) -> Tuple[int, int]:
    """(in, out) of a quantized Linear: its packed weight's shape says nothing about them."""
    return int(module.in_features), int(module.out_features)


def bnb():
    """bitsandbytes, checked: ImportError naming the extra to install when missing or too old."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(f"this model has bitsandbytes-quantized layers, and bitsandbytes is not importable "
                          f"({exc}); {INSTALL}") from None
    version = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_VERSION:
        raise ImportError(f"bitsandbytes {bitsandbytes.__version__} is too old for peftkern's 4-bit support; "
                          f"{INSTALL}")
    return bitsandbytes


def check(module: nn.Module, path: str) -> str:
    """The module's kind, after checking bitsandbytes and the device it sits on (ValueError/ImportError)."""
    k = kind(module)
    bnb()
    device = next((p.device.type for p in module.parameters()), "cpu")
    if device not in DEVICES[k] and device != "meta":
        raise ValueError(f"{path} is a bitsandbytes {k} layer on {device}, where bitsandbytes does not run it; "
                         f"devices: {', '.join(DEVICES[k])}")
    return k


def keep_trainable(model: nn.Module) -> int:
    """Keep every 4-bit layer of ``model`` differentiable (module docstring): bitsandbytes' in-place CPU
    repacking is turned off, and a layer already repacked (an eval-mode no-grad forward before
    patching) is unpacked: its inference kernel has no backward, so even a layer that is not adapted
    would stop the gradient of every adapter before it, and layers whose output width is not a
    multiple of its block fail outright. Returns how many layers it changed (their inference kernel
    is bitsandbytes' generic one from now on)."""
    changed = unpacked = 0
    for module in model.modules():
        if kind(module) != "4bit":
            continue
        repacked = getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        if repacked or getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            if repacked:
                _unpacked_state(module)
                unpacked += 1
            changed += 1
    if unpacked:  # the repacking stores the block scales in bf16: unpacking cannot give the lost bits back
        log.warning("peftkern: %d 4-bit layers had been repacked by bitsandbytes for CPU inference (an eval-mode "
                    "forward without gradients before patching); unpacked them, but their block scales keep the "
                    "bf16 rounding the repacking applied (weights within about 0.4%% to 0.6%% a row). Patch before the first such "
                    "forward to keep the checkpoint's weights exactly", unpacked)
    if changed:
        log.info("peftkern: bitsandbytes' CPU repacking (an inference kernel without a backward) is off for %d "
                 "4-bit layers", changed)
    return changed


def _unpacked_state(module: nn.Module):
    """(packed weight, quant_state) in bitsandbytes' portable layout, undoing its CPU repacking."""
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # The repacking left the block scales as [K/blocksize, N] in bf16. bitsandbytes 0.50's inverse
        # restores their layout only for a double-quantized layer, and then quantizes them to 8 bits
        # again, a second rounding (12% on a row in a test with widely spread scales). Both are
        # replaced by the bf16 scales in the flat layout, kept unquantized (fp32: 4 bytes a block).
        scales = state.absmax.t().reshape(-1).float()
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
        state.absmax = scales.contiguous()
        if state.nested:
            state.nested = False
            state.state2 = None
            state.offset = None
    return weight, state


def base_forward(module: nn.Module, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """The frozen base product of a bitsandbytes layer, bitsandbytes' op, in x's dtype (and differentiable
    in x). 4-bit: ``matmul_4bit`` in the layer's compute dtype (module docstring); 8-bit: its forward."""
    if kind(module) == "8bit":
        y = module(x)
        if not with_bias and module.bias is not None:
            y = y - module.bias.to(y.dtype)
        return y
    lib = bnb()
    weight, state = _unpacked_state(module)
    compute = module.compute_dtype or x.dtype
    bias = module.bias.to(compute) if with_bias and module.bias is not None else None
    return lib.matmul_4bit(x.to(compute), weight, bias=bias, quant_state=state).to(x.dtype)


def packed_4bit(module: nn.Module) -> tuple:
    """A 4-bit layer's W0 as the fused kernels read it: (packed, absmax, code, absmax2, code2, offset,
    blocksize, blocksize2, compute_dtype, weight_dtype), bitsandbytes' own tensors (no copy; absmax2,
    code2, offset None without double quantization; offset a one-element tensor, read on the device),
    the layer's compute dtype (None until set: the input's) and the dtype W0 was quantized from, which
    bitsandbytes' product rounds through. Layout: ``reference.dequantize_4bit``."""
    weight, state = _unpacked_state(module)
    nested = bool(state.nested)
    s2 = state.state2 if nested else None
    return (weight.data, state.absmax, state.code, s2.absmax if nested else None, s2.code if nested else None,
            state.offset.reshape(1) if nested else None, int(state.blocksize), int(s2.blocksize) if nested else 1,
            module.compute_dtype, state.dtype)


@torch.no_grad()
def dequantized(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W0 [N, K] of a quantized layer, dequantized now (a temporary: nothing keeps it)."""
    lib = bnb()
    if kind(module) == "8bit":
        weight = module.weight
        if weight.dtype != torch.int8:  # has_fp16_weights, or not yet quantized: the weight itself
            return weight.detach().to(dtype)
        scb = getattr(weight, "SCB", None)
        scb = module.state.SCB if scb is None else scb
        # bitsandbytes' own row-wise dequantization (W = CB·SCB/127 in fp32), as PEFT's: exact where
        # pushing an identity through the layer would round W0 to its fp16 output
        return lib.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).to(dtype)
    if not getattr(module.weight, "bnb_quantized", True):  # not quantized yet (built empty, on meta): the values
        return module.weight.detach().to(dtype)
    weight, state = _unpacked_state(module)
    return lib.functional.dequantize_4bit(weight.data, state).to(dtype)


def parameter_count(p: torch.Tensor) -> int:
    """How many values ``p`` stands for: a packed 4-bit weight holds two per byte of its storage (what
    PEFT's ``print_trainable_parameters`` counts), any other tensor, and a 4-bit one not quantized yet
    (a model built empty, on meta: it holds its [N, K] values), its numel."""
    if type(p).__name__ != "Params4bit" or not getattr(p, "bnb_quantized", True):
        return p.numel()
    return p.numel() * 2 * getattr(p, "quant_storage", torch.uint8).itemsize


@torch.no_grad()
def requantized(module: nn.Module, merged: torch.Tensor) -> Tuple[nn.Module, float]:
    """A new 4-bit layer of ``module``'s settings holding ``merged`` [N, K], and the relative error
    ‖Q(W) − W‖/‖W‖ of that quantization."""
    lib = bnb()
    if kind(module) != "4bit":
        raise ValueError("merging back into a quantized layer is supported for 4-bit layers only")
    state = module.weight.quant_state
    new = lib.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                            compute_dtype=module.compute_dtype, quant_type=state.quant_type,
                            compress_statistics=bool(getattr(state, "original_nested", state.nested)),
                            quant_storage=getattr(module.weight, "quant_storage", torch.uint8), device="cpu")
    params = {"weight": merged.detach().to("cpu", torch.float32)}
    if module.bias is not None:
        params["bias"] = module.bias.detach().to("cpu", torch.float32)
    new.load_state_dict(params)
    new = new.to(module.weight.device)  # quantizes on the move, as bitsandbytes does
    error = float((dequantized(new) - merged.float()).norm() / merged.float().norm().clamp_min(1e-30))
    return new, error


def full_precision(module: nn.Module, merged: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """A plain layer holding ``merged`` [N, K] (and the layer's bias) in ``dtype``: an nn.Linear, or
    the GPT-2-style Conv1D (weight [K, N]) that transformers quantized into this layer (its
    ``source_cls``), so that a saved checkpoint loads back into the model's own class."""
    source = getattr(module, "source_cls", None)
    if source is not None and source.__name__ == "Conv1D":
        out = source(module.out_features, module.in_features)  # Conv1D(nf=out, nx=in)
        out = out.to(device=merged.device, dtype=dtype)
        weight = merged.t()
        if module.bias is None:  # Conv1D always has a bias
            out.bias.data.zero_()
    else:
        out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                        device=merged.device, dtype=dtype)
        weight = merged
    with torch.no_grad():
        out.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            out.bias.copy_(module.bias.to(dtype))
    out.requires_grad_(False)
    return out


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype bitsandbytes computes the layer in (its compute dtype; bf16 for 8-bit is its input's)."""
    return getattr(module, "compute_dtype", None) or torch.float32


__all__ = ["kind", "features", "check", "keep_trainable", "base_forward", "packed_4bit", "dequantized", "requantized",
           "full_precision", "bnb",
           "compute_dtype", "INSTALL"]
