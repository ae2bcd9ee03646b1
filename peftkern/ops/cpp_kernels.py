"""The "cpp" backend: the kernels of ``backend.py`` over the compiled ops of ``peftkern._C`` (csrc/).

Each kernel is one call into C++, so no Python runs between the GEMMs of a direction. In
eager mode the adapter op goes further: ``adapter_node`` runs it as one C++ autograd node
(csrc/autograd/adapter_node.cpp), so no Python runs in its forward or backward at all.
The dataflow is torch_kernels.py's, with the rank-r work of a direction done in one
row-streaming pass and the base GEMM accumulating on top (csrc/cpu/adapter.cpp). Per
call, a cost model picks one of three paths:

    fused    the row-streaming pass + base GEMM                        CPU float32/float64
    merged   W_eff = W0 + s·(v⊙B)·(u⊙A), then one GEMM per direction    float32/float64, many rows,
             (for GEMM-sized ranks the forward keeps W_eff as aux)      never with dropout
    addmm    the same order with ATen GEMMs                             bf16/fp16, CUDA tensors

Dropout's mask is csrc/cpu/dropout.h's hash of (seed, position), inlined in the fused
pass and built as a tensor (``dropout_mask``) on the addmm path: the same mask on both.
``path_counts()`` says which paths ran (explain() reports them); ``forced_path(name)``
pins one, for tests and benchmarks. Importing this module without a working extension
raises ImportError naming the cause; dispatch turns that into a one-time warning when
``backend="auto"`` falls back to the torch backend.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from .backend import Backend
from .functions import first_order_only, new_seed
from .library import register

Tensor = torch.Tensor

_REQUIRED = ("adapter_forward", "adapter_backward", "shrink_forward", "shrink_backward", "expand_forward",
             "expand_backward", "hypernet_forward", "hypernet_backward", "update_importance_", "mask_below_",
             "gram_distances", "gram_distances_backward", "path_counts", "dropout_mask", "adapter_apply")
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

    A forced path that cannot run for the tensors (fused on bf16, merged on bf16 or with
    dropout) raises ValueError rather than substituting another.
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


def planned_paths(M: int, N: int, K: int, r: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  dropout: bool = False) -> Tuple[str, str]:
    """(forward, backward) path the cost model picks for an [M, K] input to an N×K layer of rank r."""
    return tuple(_C.planned_paths(M, N, K, r, torch.empty(0, dtype=dtype, device=device), _forced["path"], dropout))


def dropout_mask(seed: Tensor, M: int, K: int, p: float, like: Tensor) -> Tensor:
    """This backend's dropout mask for a call with ``seed``: keep[m, k] in {0, 1}, like ``like``."""
    return _C.dropout_mask(int(seed), M, K, p, like)


def adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h):
    y, h, w_eff, _ = _C.adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, int(seed), _forced["path"])
    # h is needed by a backward that trains B, u or v; with a kept W_eff the backward forms it from x itself
    return y, (h if (save_h and h is not None) else None), w_eff


def adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, seed, needs):
    grads, _ = _C.adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, int(seed), list(needs),
                                   _forced["path"])
    return list(grads)  # every operand shares dy's dtype (the extension checks it)


def shrink_forward(x, A, u, dropout, seed, save_h):
    hu, h = _C.shrink_forward(x, A, u, dropout, int(seed))
    if u is None:  # the extension returns h for both
        return hu, None
    return hu, (h if save_h else None)


def shrink_backward(dhu, x, A, u, h, dropout, seed, needs):
    return list(_C.shrink_backward(dhu, x, A, u, h, dropout, int(seed), list(needs)))


def expand_forward(x, weight, bias, hu, B, v, scale):
    return _C.expand_forward(x, weight, bias, hu, B, v, scale)


def expand_backward(dy, x, weight, hu, B, v, scale, needs):
    return list(_C.expand_backward(dy, x, weight, hu, B, v, scale, list(needs)))


def hypernet_forward(E, W1, b1, W2, b2, save):
    out, pre = _C.hypernet_forward(E, W1, b1, W2, b2)
    return out, (pre if save else None)


def hypernet_backward(dout, E, W1, W2, pre, needs):
    return list(_C.hypernet_backward(dout, E, W1, W2, pre, list(needs)))


def adapter_node(x, weight, bias, A, B, u, v, scale, dropout):
    """The adapter op as one C++ autograd node (csrc/autograd/adapter_node.cpp): the eager path.
    Its dropout seed is AdapterFunction's (``new_seed``), so both draw the same mask."""
    seed = int(new_seed(dropout)) if dropout else 0
    return _C.adapter_apply(x, weight, bias, A, B, u, v, scale, dropout, seed, _forced["path"])


KERNELS = register("cpp", {
    "adapter_forward": adapter_forward, "adapter_backward": adapter_backward,
    "shrink_forward": shrink_forward, "shrink_backward": shrink_backward,
    "expand_forward": expand_forward, "expand_backward": expand_backward,
    "hypernet_forward": hypernet_forward, "hypernet_backward": hypernet_backward,
})


def _path(N: int, K: int, r: int, dtype) -> str:
    return "fused/merged/addmm, chosen per call"


# meta: shapes only, on the addmm path (benchmarks/bench_launches.py counts its launches there)
BACKEND = Backend.of("cpp", ("cpu",) + (("cuda",) if _C.WITH_CUDA else ()) + ("meta",), KERNELS, path=_path,
                     dropout_mask=dropout_mask, adapter_node=adapter_node)


# --- AdaLoRA's step ops (not part of the adapter's Backend) ------------------------------------------

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
    @first_order_only
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


def build_info() -> Optional[str]:
    return _C.build_info()
