"""Triton kernels of the adapter and the hypernetwork, a package of their own.

Installed as ``peftkern_triton`` (this folder keeps the design's top-level place in the
repository; triton-lang publishes a package named ``triton_kernels``, so ours may not take
that name). It depends on torch and triton only, never on peftkern: peftkern's triton
backend (peftkern/ops/backends/triton.py) composes these launches into the engine's
kernel contract.

    _launch.py           what every launcher shares: autotuning with resource pruning and
                         alias checks, dtypes, rank blocks, the dropout mask
    adapter_forward.py   GEMM with a low-rank epilogue (forward, expand, and backward dx)
    shrink.py            h = D(x)·Aᵀ, hu = h⊙u (forward, joint-QKV shrink)
    adapter_backward.py  one pass over dy (dh, Gt, du) and dA = dhᵀ·D(x)
    hypernet.py          GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 for all layers in one launch
    dora.py              DoRA's column scale: y = g⊙z + b, and dz, dg in one pass over dy
    aot_check.py         compile every kernel for a CUDA target on a machine without a GPU

On CUDA the kernels are autotuned; on the CPU they run under ``TRITON_INTERPRET=1``
(set before triton is imported) with one fixed config, which is how the tests run them.
``launch_counts()`` reports kernel launches by name since ``reset_launch_counts()``.
"""
from ._launch import MAX_RANK, launch_counts, reset_launch_counts

__all__ = ["MAX_RANK", "launch_counts", "reset_launch_counts"]
