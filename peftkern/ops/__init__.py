"""Ops: the math of the adapter, independent of where factors come from.

``reference`` is the truth; ``torch_backend`` hand-writes the backward in ATen calls;
``cpp_backend`` (csrc/) and ``triton_kernels`` (top level) mirror it; ``dispatch`` chooses.
"""
