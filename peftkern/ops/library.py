"""Every backend kernel as a ``torch.library`` custom op, so torch.compile sees the adapter.

``register(backend, impls)`` defines ``torch.ops.peftkern.<backend>_<kernel>`` for each
kernel of ``backend.py``'s contract, with one schema and one fake (meta) implementation
per kernel shared by all backends, and returns the callables the autograd wrappers use:

* under torch.compile (``torch.compiler.is_compiling()``) they call the custom op, which
  dynamo and AOTAutograd treat as one opaque node with the fake's shapes and dtypes;
* in eager mode they call the Python implementation directly: a custom op costs ~15 µs
  of dispatcher overhead per call (measured on the CPU), which would add up to
  milliseconds per step over a model's adapted modules.

The fakes are the shape contract: a backend whose outputs differ from them in shape or
dtype is wrong, and tests/unit/test_ops_library.py runs ``torch.library.opcheck`` on each.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

Tensor = torch.Tensor

SCHEMAS: Dict[str, str] = {
    "adapter_forward": "(Tensor x, Tensor? weight, Tensor? bias, Tensor A, Tensor B, Tensor? u, Tensor? v, "
                       "float scale, float dropout, Tensor seed, bool save_h) -> (Tensor, Tensor, Tensor)",
    "adapter_backward": "(Tensor dy, Tensor? x, Tensor? weight, Tensor A, Tensor B, Tensor? u, Tensor? v, "
                        "Tensor? h, Tensor? aux, float scale, float dropout, Tensor seed, bool[] needs) -> Tensor[]",
    "shrink_forward": "(Tensor x, Tensor A, Tensor? u, float dropout, Tensor seed, bool save_h) -> (Tensor, Tensor)",
    "shrink_backward": "(Tensor dhu, Tensor? x, Tensor A, Tensor? u, Tensor? h, float dropout, Tensor seed, "
                       "bool[] needs) -> Tensor[]",
    "expand_forward": "(Tensor x, Tensor weight, Tensor? bias, Tensor hu, Tensor B, Tensor? v, float scale) -> Tensor",
    "expand_backward": "(Tensor dy, Tensor? x, Tensor weight, Tensor hu, Tensor B, Tensor? v, float scale, "
                       "bool[] needs) -> Tensor[]",
    "hypernet_forward": "(Tensor E, Tensor W1, Tensor? b1, Tensor W2, Tensor? b2, bool save) -> (Tensor, Tensor)",
    "hypernet_backward": "(Tensor dout, Tensor E, Tensor W1, Tensor W2, Tensor pre, bool[] needs) -> Tensor[]",
    "dora_scale_forward": "(Tensor z, Tensor g, Tensor? bias) -> Tensor",
    "dora_scale_backward": "(Tensor dy, Tensor saved, Tensor g, Tensor? bias, bool from_output, bool need_g, "
                           "bool need_dz) -> (Tensor, Tensor)",
    # optional (OPTIONAL): the adapter over a bitsandbytes 4-bit W0, given as its packed state
    "adapter_4bit_forward": "(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, Tensor? code2, "
                            "Tensor? offset, int blocksize, int blocksize2, ScalarType? compute_dtype, "
                            "ScalarType weight_dtype, Tensor? bias, Tensor A, Tensor B, Tensor? u, "
                            "Tensor? v, float scale, float dropout, Tensor seed, bool save_h) -> (Tensor, Tensor)",
    "adapter_4bit_backward": "(Tensor dy, Tensor? x, Tensor packed, Tensor absmax, Tensor code, Tensor? absmax2, "
                             "Tensor? code2, Tensor? offset, int blocksize, int blocksize2, ScalarType? compute_dtype, "
                             "ScalarType weight_dtype, Tensor A, Tensor B, "
                             "Tensor? u, Tensor? v, Tensor? h, float scale, float dropout, Tensor seed, bool[] needs) "
                             "-> Tensor[]",
}
# kernels a backend may leave out (backend.py says what runs instead)
OPTIONAL = frozenset({"adapter_4bit_forward", "adapter_4bit_backward"})


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other dtype accumulates in fp32 (the hypernetwork's saved pre-activation)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _none(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _grads(needs: List[bool], shapes, like: Tensor) -> List[Tensor]:
    return [torch.empty(s, dtype=d, device=like.device) if n else _none(like) for n, (s, d) in zip(needs, shapes)]


def _adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h):
    M, r = x.shape[0], A.shape[0]
    y = x.new_empty(M, B.shape[0])
    h = x.new_empty(M, r) if save_h else _none(x)
    return y, h, _none(x)  # aux: a backend whose eager kernel returns one (the C++ merged weight) traces another


def _adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, seed, needs):
    M, K, N = dy.shape[0], A.shape[1], B.shape[0]
    w_dtype = weight.dtype if weight is not None else dy.dtype
    shapes = [((M, K), dy.dtype), ((N, K), w_dtype), ((N,), w_dtype),
              (A.shape, A.dtype), (B.shape, B.dtype), (A.shape[:1], u.dtype if u is not None else A.dtype),
              (B.shape[:1], v.dtype if v is not None else B.dtype)]
    return _grads(needs, shapes, dy)


def _shrink_forward(x, A, u, dropout, seed, save_h):
    M, r = x.shape[0], A.shape[0]
    return x.new_empty(M, r), (x.new_empty(M, r) if (save_h and u is not None) else _none(x))


def _shrink_backward(dhu, x, A, u, h, dropout, seed, needs):
    shapes = [((dhu.shape[0], A.shape[1]), dhu.dtype), (A.shape, A.dtype),
              (A.shape[:1], u.dtype if u is not None else A.dtype)]
    return _grads(needs, shapes, dhu)


def _expand_forward(x, weight, bias, hu, B, v, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def _expand_backward(dy, x, weight, hu, B, v, scale, needs):
    M = dy.shape[0]
    shapes = [((M, weight.shape[1]), dy.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), weight.dtype),
              (hu.shape, hu.dtype), (B.shape, B.dtype), (B.shape[:1], v.dtype if v is not None else B.dtype)]
    return _grads(needs, shapes, dy)


def _hypernet_forward(E, W1, b1, W2, b2, save):
    L = E.shape[0]
    pre = E.new_empty(L, W1.shape[0], dtype=acc_dtype(E.dtype)) if save else _none(E)
    return E.new_empty(L, W2.shape[0]), pre


def _hypernet_backward(dout, E, W1, W2, pre, needs):
    shapes = [(E.shape, E.dtype), (W1.shape, W1.dtype), (W1.shape[:1], W1.dtype), (W2.shape, W2.dtype),
              (W2.shape[:1], W2.dtype)]  # bias gradients in the weights' dtype
    return _grads(needs, shapes, dout)


def _dora_scale_forward(z, g, bias):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _dora_scale_backward(dy, saved, g, bias, from_output, need_g, need_dz):
    return (torch.empty_like(dy, memory_format=torch.contiguous_format) if need_dz else _none(dy),
            g.new_empty(g.shape) if need_g else _none(g))


def _adapter_4bit_forward(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, compute_dtype,
                          weight_dtype, bias, A, B, u, v, scale, dropout, seed, save_h):
    M, r = x.shape[0], A.shape[0]
    return x.new_empty(M, B.shape[0]), (x.new_empty(M, r) if save_h else _none(x))


def _adapter_4bit_backward(dy, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, compute_dtype,
                           weight_dtype, A, B, u, v, h, scale, dropout, seed, needs):
    M, K = dy.shape[0], A.shape[1]
    shapes = [((M, K), dy.dtype), (A.shape, A.dtype), (B.shape, B.dtype),
              (A.shape[:1], u.dtype if u is not None else A.dtype), (B.shape[:1], v.dtype if v is not None else B.dtype)]
    return _grads(needs, shapes, dy)


FAKES: Dict[str, Callable] = {
    "adapter_forward": _adapter_forward, "adapter_backward": _adapter_backward,
    "shrink_forward": _shrink_forward, "shrink_backward": _shrink_backward,
    "expand_forward": _expand_forward, "expand_backward": _expand_backward,
    "hypernet_forward": _hypernet_forward, "hypernet_backward": _hypernet_backward,
    "dora_scale_forward": _dora_scale_forward, "dora_scale_backward": _dora_scale_backward,
    "adapter_4bit_forward": _adapter_4bit_forward, "adapter_4bit_backward": _adapter_4bit_backward,
}

_REGISTERED: Dict[str, tuple] = {}  # qualname -> (custom op, its _Forward)

# Kernels that write their result over their first argument in eager mode (the caller's own scratch,
# to spare an [M, N] allocation). A custom op may neither mutate an input it does not declare nor
# return an alias of one, so under compile the op works on a copy.
IN_PLACE_FIRST = frozenset({"dora_scale_forward"})


class KernelOp:
    """One backend kernel: the Python implementation in eager mode, the custom op under compile.

    This is where the compiled and the eager paths part, and the only place: a custom op costs
    ~15 µs of dispatcher overhead per call (module docstring), a trace needs the op."""

    __slots__ = ("impl", "op", "name")

    def __init__(self, name: str, impl: Callable, op):
        self.name, self.impl, self.op = name, impl, op

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.impl(*args)


def register(backend: str, impls: Dict[str, Callable], traced: Optional[Dict[str, Callable]] = None
             ) -> Dict[str, KernelOp]:
    """Define ``torch.ops.peftkern.<backend>_<kernel>`` for every kernel in ``impls`` (which must be
    the kernels of ``SCHEMAS``, the ``OPTIONAL`` ones optionally) and return them as ``KernelOp``
    callables, by kernel name. ``traced``: for some kernels, the implementation the custom op runs
    (under torch.compile) in place of the eager one, where the eager one may return what the fake
    cannot promise (the C++ merged path's outputs)."""
    missing, extra = sorted(set(SCHEMAS) - OPTIONAL - set(impls)), sorted(set(impls) - set(SCHEMAS))
    if missing or extra:
        raise ValueError(f"backend {backend!r}: kernels missing {missing}, unknown {extra}")
    out: Dict[str, KernelOp] = {}
    for name, impl in impls.items():
        qualname = f"peftkern::{backend}_{name}"
        if qualname not in _REGISTERED:  # a module reloaded in one process keeps its first registration
            forward = _Forward(impl, copy_first=name in IN_PLACE_FIRST)
            op = torch.library.custom_op(qualname, forward, mutates_args=(), schema=SCHEMAS[name])
            op.register_fake(FAKES[name])
            _REGISTERED[qualname] = (op, forward)
        op, forward = _REGISTERED[qualname]
        forward.target = (traced or {}).get(name, impl)
        out[name] = KernelOp(qualname, impl, op)
    return out


class _Forward:
    """The custom op's implementation: forwards to a replaceable target (see ``register``).

    Outputs are made contiguous here, because the fakes promise contiguous strides (a compiled
    graph asserts them; a kernel may return a transposed view, e.g. dB = Gtᵀ·s). A contiguous
    output is returned as is, so this copies only the small rank-sized views. A kernel returns
    None for an output nobody asked for (no allocation in eager mode); a custom op cannot
    return None, so here it becomes an empty placeholder."""

    def __init__(self, target: Callable, copy_first: bool = False):
        self.target = target
        self.copy_first = copy_first

    def __call__(self, *args):
        if self.copy_first:
            args = (args[0].clone(), *args[1:])
        out = self.target(*args)
        if isinstance(out, torch.Tensor):
            return out.contiguous()
        like = next(a for a in args if isinstance(a, torch.Tensor))
        return type(out)(_none(like) if t is None else t.contiguous() for t in out)


__all__ = ["SCHEMAS", "OPTIONAL", "FAKES", "KernelOp", "register", "acc_dtype"]
