"""The built-in backends, each declared to the registry once (importing ``peftkern.ops`` runs this).

    name     serves                       auto's order                 kernels
    triton   cuda; cpu under the           never by default; cuda       peftkern_triton (triton_kernels/)
             interpreter                   shapes of a verified policy
    cpp      cpu (+ cuda in a CUDA build)  cpu: first                   peftkern._C (csrc/)
    torch    every device                  cuda and any other: first;   ATen calls (cuBLAS on CUDA)
                                           cpu: after cpp

The loaders import their module only when a backend is first asked for, so importing
peftkern imports neither triton nor the compiled extension. Why CUDA runs on torch by
default: the first GPU run found wrong Triton gradients and a crash (fixed since, checked
on the CPU only); auto takes Triton or the C++ node on CUDA only for the module shapes a
verified GPU run lists in ``ops/cuda_policy.json``, written by hand from a passing
``benchmarks/gpu_check.sh`` run's step timings (no script writes it; none exists yet).
"""
from __future__ import annotations

import os
from typing import Optional

from ..backend import Backend
from ..registry import BackendSpec, register_backend


def _load_torch() -> Backend:
    from . import torch as torch_backend

    return torch_backend.BACKEND


def _load_cpp() -> Backend:
    from . import cpp  # raises ImportError naming the cause if the extension is missing

    return cpp.BACKEND


def _load_triton() -> Backend:
    try:
        from . import triton as triton_backend
    except ImportError as exc:  # triton itself, or the kernels package, is missing
        raise ImportError(f"cannot import the Triton kernels (peftkern_triton): {exc}") from exc
    return triton_backend.BACKEND


def _triton_precheck(device_type: str) -> Optional[str]:
    """Triton compiles for CUDA; on the CPU it runs only under the interpreter."""
    if device_type == "cuda":
        import torch

        return None if torch.cuda.is_available() else "Triton compiles for CUDA and no CUDA device is available"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"backend='triton' cannot run {device_type} tensors: Triton compiles for CUDA, and runs on the CPU "
            "only under TRITON_INTERPRET=1 (set before triton is imported)")


register_backend(BackendSpec("triton", _load_triton, precheck=_triton_precheck, policy=True))
register_backend(BackendSpec("cpp", _load_cpp, auto={"cpu": 0}, policy=True,
                             why={"cpu": "the C++ extension's fused row-streaming kernels"}))
register_backend(BackendSpec("torch", _load_torch, auto={"cpu": 1, "*": 0}, why={
    "cuda": "the Triton kernels are not yet verified on a GPU; backend='triton' runs them anyway"}))

__all__: list = []
