"""The "cpp" backend: autograd Functions over the compiled ops of ``peftkern._C`` (csrc/).

Each Function makes one call into C++ per direction, so no Python runs between the
GEMMs of a forward or a backward. The dataflow is torch_backend's (read its docstring),
with the rank-r work done in one row-streaming pass and the base GEMM accumulating on
top of it (csrc/cpu/adapter.cpp). Per call, a cost model picks one of three paths:

    fused    the row-streaming pass + base GEMM                        CPU float32/float64
    merged   W_eff = W0 + s·(v⊙B)·(u⊙A), then one GEMM per direction    float32/float64, many rows
             (for GEMM-sized ranks the forward keeps W_eff for the backward)
    addmm    the same order with ATen GEMMs                             bf16/fp16, CUDA tensors

``path_counts()`` says which paths ran (explain() can report it); ``forced_path(name)``
pins one, for tests and benchmarks. Importing this module without a working extension
raises ImportError naming the cause; dispatch turns that into a one-time warning when
``backend="auto"`` falls back to the torch backend.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from . import dispatch

Tensor = torch.Tensor

_REQUIRED = ("adapter_forward", "adapter_backward", "shrink_forward", "shrink_backward", "expand_forward",
             "expand_backward", "hypernet_forward", "hypernet_backward", "update_importance_", "mask_below_",
             "gram_distances", "gram_distances_backward", "path_counts")
_REBUILD = "build it with `pip install --no-build-isolation -e .` (torch must be installed first)"


def _load_extension():
    try:
        from peftkern import _C
    except ImportError as exc:
        raise ImportError(f"peftkern's C++ extension peftkern._C is not available ({exc}); {_REBUILD}") from exc
    missing = [name for name in _REQUIRED if not hasattr(_C, name)]
    if missing:
        raise ImportError(f"peftkern._C is an outdated build (it lacks {', '.join(missing)}); re{_REBUILD[1:]}")
    return _C


_C = _load_extension()

PATHS = {"auto": _C.PATH_AUTO, "fused": _C.PATH_FUSED, "merged": _C.PATH_MERGED, "addmm": _C.PATH_ADDMM}
_forced = {"path": _C.PATH_AUTO}


@contextlib.contextmanager
def forced_path(name: str) -> Iterator[None]:
    """Run every adapter call inside the block on one path ("auto" restores the cost model).

    A forced path that cannot run for the tensors (fused on bf16, merged on bf16) raises
    ValueError rather than substituting another.
    """
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; valid choices: {', '.join(PATHS)}")
    previous = _forced["path"]
    _forced["path"] = PATHS[name]
    try:
        yield
    finally:
        _forced["path"] = previous


def path_counts() -> Dict[str, int]:
    """{"adapter.forward.fused": calls, ...} for every path that ran since the last reset."""
    return dict(_C.path_counts())


def reset_path_counts() -> None:
    _C.reset_path_counts()


def planned_paths(M: int, N: int, K: int, r: int, dtype: torch.dtype = torch.float32,
                  device: str = "cpu") -> Tuple[str, str]:
    """(forward, backward) path the cost model picks for an [M, K] input to an N×K layer of rank r."""
    return tuple(_C.planned_paths(M, N, K, r, torch.empty(0, dtype=dtype, device=device), _forced["path"]))


class AdapterFunction(torch.autograd.Function):
    """y = W0·x + b + s·(v ⊙ (B·(u ⊙ (A·x)))) for one target; saves x, plus h = x·Aᵀ on the
    unmerged paths, or W_eff on the merged path with a GEMM-sized rank (see csrc/cpu/paths.cpp)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, u, v, scale):
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        y, h, w_eff, _path = _C.adapter_forward(x2, weight, bias, A, B, u, v, scale, _forced["path"])
        ctx.save_for_backward(x2, weight, A, B, u, v, h, w_eff)
        ctx.scale, ctx.x_shape, ctx.path = scale, x.shape, _forced["path"]
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, A, B, u, v, h, w_eff = ctx.saved_tensors
        g = gy.reshape(-1, weight.shape[0])
        (dx, dw, db, dA, dB, du, dv), _path = _C.adapter_backward(
            g, x2, weight, A, B, u, v, h, w_eff, ctx.scale, list(ctx.needs_input_grad[:7]), ctx.path)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, dA, dB, du, dv, None


class ShrinkFunction(torch.autograd.Function):
    """hu = (x·Aᵀ) ⊙ u: the joint form's shared down-projection."""

    @staticmethod
    def forward(ctx, x, A, u):
        x2 = x.reshape(-1, x.shape[-1])
        hu, h = _C.shrink_forward(x2, A, u)
        ctx.save_for_backward(x2, A, u, h)
        ctx.x_shape = x.shape
        return hu

    @staticmethod
    def backward(ctx, dhu):
        x2, A, u, h = ctx.saved_tensors
        dx, dA, du = _C.shrink_backward(dhu, x2, A, u, h, list(ctx.needs_input_grad[:3]))
        return (dx.view(ctx.x_shape) if dx is not None else None), dA, du


class ExpandFunction(torch.autograd.Function):
    """y = W0·x + b + s·(v ⊙ (B·hu)) given a precomputed hu [M, r]."""

    @staticmethod
    def forward(ctx, x, weight, bias, hu, B, v, scale):
        N, K = weight.shape
        x2 = x.reshape(-1, K)
        y = _C.expand_forward(x2, weight, bias, hu, B, v, scale)
        ctx.save_for_backward(x2, weight, hu, B, v)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy):
        x2, weight, hu, B, v = ctx.saved_tensors
        g = gy.reshape(-1, weight.shape[0])
        dx, dw, db, dhu, dB, dv = _C.expand_backward(g, x2, weight, hu, B, v, ctx.scale,
                                                     list(ctx.needs_input_grad[:6]))
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, dhu, dB, dv, None


class HypernetFunction(torch.autograd.Function):
    """GeLU(E·W1ᵀ + b1)·W2ᵀ + b2 → [L, P] for all layers at once (exact erf GeLU); saves pre-activations."""

    @staticmethod
    def forward(ctx, E, W1, b1, W2, b2):
        out, pre = _C.hypernet_forward(E, W1, b1, W2, b2)
        ctx.save_for_backward(E, W1, W2, pre)
        return out

    @staticmethod
    def backward(ctx, dout):
        E, W1, W2, pre = ctx.saved_tensors
        return tuple(_C.hypernet_backward(dout.contiguous(), E, W1, W2, pre, list(ctx.needs_input_grad[:5])))


def adapter(x, weight, bias, A, B, u, v, scale):
    return AdapterFunction.apply(x, weight, bias, A, B, u, v, scale)


def shrink(x, A, u):
    return ShrinkFunction.apply(x, A, u)


def expand(x, weight, bias, hu, B, v, scale):
    return ExpandFunction.apply(x, weight, bias, hu, B, v, scale)


def hypernet(E, W1, b1, W2, b2):
    return HypernetFunction.apply(E, W1, b1, W2, b2)


@torch.no_grad()
def update_importance_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg_ipt: Sequence[Tensor],
                       exp_avg_unc: Sequence[Tensor], beta1: float, beta2: float) -> None:
    """AdaLoRA's score update for every tensor in one call, in place; bit for bit
    ``importance.update_reference_`` (and PEFT's update_ipt)."""
    _C.update_importance_(list(params), list(grads), list(exp_avg_ipt), list(exp_avg_unc), float(beta1), float(beta2))


class GramDistancesFunction(torch.autograd.Function):
    """‖PᵀP − I‖_F for each P, then ‖QQᵀ − I‖_F for each Q: one C++ call per direction
    (csrc/cpu/orthogonality.cpp) instead of a handful of tiny ops per matrix."""

    @staticmethod
    def forward(ctx, n_columns, *mats):
        distances, D = _C.gram_distances(list(mats[:n_columns]), list(mats[n_columns:]))
        ctx.n_columns = n_columns
        ctx.save_for_backward(distances, D, *mats)  # D: every G − I (r×r each), so backward skips the Grams
        return distances

    @staticmethod
    def backward(ctx, grad):
        distances, D, *mats = ctx.saved_tensors
        n = ctx.n_columns
        grads = _C.gram_distances_backward(grad.contiguous(), distances, D, mats[:n], mats[n:])
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])))


def gram_distances(columns: Sequence[Tensor], rows: Sequence[Tensor]) -> Tensor:
    """[len(columns) + len(rows)] distances from orthogonality, differentiable. CPU float32/float64."""
    return GramDistancesFunction.apply(len(columns), *columns, *rows)


@torch.no_grad()
def mask_below_(values: Sequence[Tensor], scores: Sequence[Tensor], threshold: Tensor) -> None:
    """``values[i][scores[i] <= threshold] = 0`` for every i, in place (PEFT's mask_to_budget
    step), with the threshold kept as a tensor. CPU tensors."""
    _C.mask_below_(list(values), list(scores), threshold)


BACKEND = dispatch.Backend("cpp", adapter, shrink, expand, hypernet,
                           devices=("cpu",) + (("cuda",) if _C.WITH_CUDA else ()))


def build_info() -> Optional[str]:
    return _C.build_info()
