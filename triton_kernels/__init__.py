"""Triton kernels for peftkern: one op per file (kernel + launcher + autograd.Function).

    adapter_forward.py   GEMM with a low-rank epilogue (forward, expand and backward dx)
    shrink.py            h = x·Aᵀ, hu = h⊙u (forward variant b, joint-QKV shrink)
    adapter_backward.py  one pass over dy (dh, Gt, du) and dA = dhᵀ·x
    adapter.py / expand.py   the autograd Functions tying them together
    hypernet.py          GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 for all layers in one launch

On CUDA the kernels are autotuned; on the CPU they run under ``TRITON_INTERPRET=1``
(set before triton is imported) with one fixed config, which is how the tests run them.
``launch_counts()`` reports kernel launches by name since ``reset_launch_counts()``.
"""
from peftkern.ops.dispatch import Backend

from ._launch import launch_counts, reset_launch_counts
from .adapter import FORWARD_VARIANTS, forward_variant, set_forward_variant
from .adapter import adapter as _adapter
from .expand import expand as _expand
from .hypernet import hypernet as _hypernet
from .shrink import shrink as _shrink

# The ops are reached through BACKEND (as dispatch does), not re-exported by name: the
# names adapter/shrink/expand/hypernet belong to the submodules.
BACKEND = Backend("triton", _adapter, _shrink, _expand, _hypernet, devices=("cuda", "cpu"))

__all__ = ["BACKEND", "launch_counts", "reset_launch_counts", "FORWARD_VARIANTS", "forward_variant",
           "set_forward_variant"]
