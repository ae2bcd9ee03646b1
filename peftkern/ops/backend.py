"""What a backend is: the 2-D kernels of the adapter's ops, and optionally AdaLoRA's step ops.

A backend provides kernels only. The autograd wrappers (``functions.py``: reshape to 2-D,
``needs_input_grad``, what to save, view back) are written once per op and call these
kernels; ``library.py`` registers each kernel as a ``torch.library`` custom op so that
torch.compile sees an opaque node with a fake implementation instead of a graph break.
A backend declares itself to the registry (``registry.py``): its name, the device types it
serves, its place in ``backend="auto"``'s order and a loader that builds this object.

Kernel contract (every backend, same schemas as ``library.SCHEMAS``). All matrices are
2-D: x [M, K], weight [N, K], bias [N], A [r, K], B [N, r], u [r], v [N], hu [M, r],
E [L, h_in], W1 [h2, h_in], W2 [P, h2]. ``scale`` is s = α/r, ``dropout`` the
probability p of zeroing an element of the adapter's input (0 = off), ``seed`` a
one-element int64 CPU tensor from which the backend derives its dropout mask (the same
seed gives the same mask in forward and backward, so no mask is ever stored).
Backward kernels take ``needs`` (ctx.needs_input_grad of the differentiable inputs) and
return one entry per differentiable input, a tensor in the dtype of that input, or None
where the ``needs`` flag is False (under torch.compile the custom op turns None into an
empty placeholder, library.py).

    adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h) -> (y, h, aux)
    adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, seed, needs[7]) -> 7 grads
    shrink_forward(x, A, u, dropout, seed, save_h) -> (hu, h)
    shrink_backward(dhu, x, A, u, h, dropout, seed, needs[3]) -> (dx, dA, du)
    expand_forward(x, weight, bias, hu, B, v, scale) -> y
    expand_backward(dy, x, weight, hu, B, v, scale, needs[6]) -> (dx, dweight, dbias, dhu, dB, dv)
    hypernet_forward(E, W1, b1, W2, b2, save) -> (out, pre)
    hypernet_backward(dout, E, W1, W2, pre, needs[5]) -> (dE, dW1, db1, dW2, db2)
    dora_scale_forward(z, g, bias) -> y = g⊙z + bias                     z [M, N], g [N]; may reuse z
    dora_scale_backward(dy, saved, g, bias, from_output, need_g, need_dz) -> (dz = dy⊙g, dg = Σ_m dy⊙z)
        where z is ``saved``, or with ``from_output`` (``saved`` is y) z = (y − bias)/g: one pass over dy;
        dz None unless ``need_dz`` (then the pass only reads, and g may be wider than dy: DoRA's folded
        route passes an fp32 m itself); dg in g's dtype

``weight`` may be None in the adapter kernels of a backend that declares ``lowrank_only``: the
base product then runs elsewhere (a quantized base layer), and y is the low-rank term (+ bias).

Optional: the adapter over a bitsandbytes 4-bit W0 [N, K] in one launch each way (QLoRA fused),
given as its packed state (``quant.packed_4bit``; layout in triton_kernels/weight4bit.py). A
backend without them runs a 4-bit base as bitsandbytes' op plus the low-rank term above.

    adapter_4bit_forward(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                         compute_dtype, weight_dtype, bias, A, B, u, v, scale, dropout, seed, save_h) -> (y, h)
    adapter_4bit_backward(dy, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2,
                          compute_dtype, weight_dtype, A, B, u, v, h, scale, dropout, seed, needs[5])
                          -> (dx, dA, dB, du, dv)

where the base product rounds as bitsandbytes 0.50's ``matmul_4bit``: W0 and x (dy) in
``compute_dtype`` (the layer's; None: x's), the product and the bias (given in ``compute_dtype``)
rounded to it; in the backward W0 first rounded to ``weight_dtype`` (the dtype it was quantized
from), as its ``dequantize_4bit`` returns it; the low-rank term in x's dtype.

h is x·Aᵀ (before u; with dropout, of the kept and rescaled input), or that times a constant
the backend's own backward expects, [M, r] in x's dtype, returned only when
``save_h`` asks for it (else None); ``aux`` is any other tensor the backend wants back in
its backward (the C++ backend's merged weight), or None. x may be None in a backward when
the wrapper did not keep it (no gradient needs it).

AdaLoRA's step ops (``StepOps``) run once per optimizer step, on lists of tensors:

    update_importance(params, grads, exp_avg_ipt, exp_avg_unc, beta1, beta2)   in place
    gram_distances(columns, rows) -> [len(columns) + len(rows)]                differentiable
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

KERNEL_NAMES = ("adapter_forward", "adapter_backward", "shrink_forward", "shrink_backward", "expand_forward",
                "expand_backward", "hypernet_forward", "hypernet_backward", "dora_scale_forward", "dora_scale_backward")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here (not built, not importable, or not for these tensors); the message says why."""


@dataclass(frozen=True)
class StepOps:
    """AdaLoRA's per-step ops of one backend (module docstring), for the tensors ``serves`` accepts."""

    update_importance: Callable
    gram_distances: Callable
    # (op name, tensors) -> whether this backend's op runs them (device, dtype); the registry falls
    # back to the torch backend's otherwise
    serves: Callable[[str, Sequence[torch.Tensor]], bool] = lambda op, tensors: True


@dataclass(frozen=True)
class Backend:
    name: str
    devices: Tuple[str, ...]  # device types whose tensors it accepts
    adapter_forward: Callable
    adapter_backward: Callable
    shrink_forward: Callable
    shrink_backward: Callable
    expand_forward: Callable
    expand_backward: Callable
    hypernet_forward: Callable
    hypernet_backward: Callable
    dora_scale_forward: Callable
    dora_scale_backward: Callable
    # (N, K, r, dtype) -> the code path a module of that shape runs, for explain()
    path: Optional[Callable[[int, int, int, object], str]] = None
    # (seed, M, K, p, like) -> keep [M, K] in {0, 1}: the dropout mask the kernels apply for a
    # call with that seed (for tests and diagnostics; the kernels never store it)
    dropout_mask: Optional[Callable] = None
    # (x, weight, bias, A, B, u, v, scale, dropout) -> y: the adapter op with this backend's kernels
    # as one compiled autograd node, which functions.adapter calls in eager mode instead of its
    # Python autograd.Function (same kernels, same saved tensors, less host time per call)
    adapter_node: Optional[Callable] = None
    # (x, weight, bias, A, B, u, v, m, norm, scale) -> y: DoRA without dropout the same way, as one
    # compiled node instead of functions.DoraFunction (``norm`` as functions.dora_adapter takes it)
    dora_node: Optional[Callable] = None
    # the largest rank the kernels take (the whole rank in one tile); a module of a larger rank
    # is given to ``over_rank`` by the registry, which says so in explain()
    max_rank: Optional[int] = None
    over_rank: str = "torch"
    # whether the adapter kernels take weight=None (the low-rank term alone, the base computed
    # elsewhere: a 4-bit base layer); the registry gives such modules to ``over_rank`` otherwise
    lowrank_only: bool = True
    step: Optional[StepOps] = None
    adapter_4bit_forward: Optional[Callable] = None  # optional kernels (module docstring)
    adapter_4bit_backward: Optional[Callable] = None
    # set where adapter_forward's aux, when it is not None, is W_eff = W0 + s·Λv·B·Λu·A [N, K] in
    # weight's dtype (the C++ merged path): the rank above which a forward may keep it. DoRA then
    # takes its norm from it, and explain() says so
    merged_weight_above_rank: Optional[int] = None

    @property
    def fuses_4bit(self) -> bool:
        """Whether this backend computes a 4-bit base and the adapter in one kernel (else bitsandbytes + ours)."""
        return self.adapter_4bit_forward is not None

    def path_for(self, N: int, K: int, r: int, dtype) -> str:
        return self.path(N, K, r, dtype) if self.path is not None else self.name

    @classmethod
    def of(cls, name: str, devices: Tuple[str, ...], kernels: Dict[str, Callable], **extra) -> "Backend":
        """A backend from ``library.register``'s kernels (a dict by kernel name) and the optional fields."""
        return cls(name, tuple(devices), **kernels, **extra)


__all__ = ["Backend", "BackendUnavailable", "StepOps", "KERNEL_NAMES"]
