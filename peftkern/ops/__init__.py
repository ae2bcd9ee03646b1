"""Ops: the math of the adapter, independent of where factors come from.

    reference.py   plain torch, the truth every backend is tested against
    backend.py     what a backend is: the kernels' contract (and AdaLoRA's step ops)
    registry.py    the backends' registry, and the one place that decides which backend runs
    backends/      the built-in backends: torch (ATen), cpp (csrc/), triton (triton_kernels/)
    library.py     every kernel as a torch.library custom op, so torch.compile sees it
    functions.py   the ops as autograd Functions over any backend's kernels
    importance.py  AdaLoRA's per-step ops (importance scores, orthogonality distances)
"""
from . import backends  # noqa: F401  (declares the built-in backends to the registry)
