"""Triton kernels for peftkern, installed as ``peftkern.triton_kernels`` (this folder keeps the
design's top-level place in the repository; installing it under peftkern avoids a clash
with triton-lang's own ``triton_kernels`` package).

    _launch.py           what every launcher shares: autotuning with resource pruning and
                         alias checks, dtypes, rank blocks, the dropout mask
    adapter_forward.py   GEMM with a low-rank epilogue (forward, expand, and backward dx)
    shrink.py            h = D(x)·Aᵀ, hu = h⊙u (forward, joint-QKV shrink)
    adapter_backward.py  one pass over dy (dh, Gt, du) and dA = dhᵀ·D(x)
    hypernet.py          GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 for all layers in one launch
    kernels.py           the backend's kernels (peftkern/ops/backend.py's contract) from these
    aot_check.py         compile every kernel for a CUDA target on a machine without a GPU

On CUDA the kernels are autotuned; on the CPU they run under ``TRITON_INTERPRET=1``
(set before triton is imported) with one fixed config, which is how the tests run them.
``launch_counts()`` reports kernel launches by name since ``reset_launch_counts()``.
"""
from ._launch import launch_counts, reset_launch_counts
from .kernels import BACKEND, FORWARD_VARIANTS, dropout_mask, forward_variant, set_forward_variant

__all__ = ["BACKEND", "launch_counts", "reset_launch_counts", "FORWARD_VARIANTS", "forward_variant",
           "set_forward_variant", "dropout_mask"]
