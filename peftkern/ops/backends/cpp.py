"""The "cpp" backend: the kernels of ``backend.py`` over the compiled ops of ``peftkern._C`` (csrc/).

Each kernel is one call into C++, so no Python runs between the GEMMs of a direction. In
eager mode the adapter op goes further: ``adapter_node`` runs it as one C++ autograd node
(csrc/autograd/adapter_node.cpp), so no Python runs in its forward or backward at all.
The dataflow is the torch backend's (backends/torch.py), with the rank-r work of a direction done in one
row-streaming pass and the base GEMM accumulating on top (csrc/cpu/adapter.cpp). Per
call, a cost model picks one of three paths:

    fused    the row-streaming pass + base GEMM                        CPU float32/float64
    merged   W_eff = W0 + s·(v⊙B)·(u⊙A), then one GEMM per direction    float32/float64, many rows,
             (for GEMM-sized ranks the forward keeps W_eff as aux)      never with dropout
    addmm    the same order with ATen GEMMs                             bf16/fp16, CUDA tensors

Under torch.compile the adapter's custom op never takes the merged path (``traced_adapter_forward``):
its outputs (no h; W_eff kept as aux) are not the op's fake's, which inductor asserts.

Dropout's mask is csrc/cpu/dropout.h's hash of (seed, position), inlined in the fused
pass and built as a tensor (``dropout_mask``) on the addmm path: the same mask on both.
``path_counts()`` says which paths ran (explain() reports them); ``with forced_path(name):``
pins one for the calls inside the block, for tests and benchmarks. Importing this module
without a working extension raises ImportError naming the cause; the registry turns that
into a one-time warning when ``backend="auto"`` falls back to the torch backend.

AdaLoRA's step ops (``STEP``) are the extension's too, for CPU tensors: the importance
update of every tensor in one call, and the orthogonality distances in one call per direction.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..backend import Backend, StepOps
from ..functions import DORA_INPLACE_ADVICE, dora_folds, first_order_only, new_seed, norm_gain
from ..library import acc_dtype, register

Tensor = torch.Tensor

_REQUIRED = ("adapter_forward", "adapter_backward", "shrink_forward", "shrink_backward", "expand_forward",
             "expand_backward", "hypernet_forward", "hypernet_backward", "update_importance_",
             "gram_distances", "gram_distances_backward", "path_counts", "dropout_mask", "adapter_apply",
             "dora_scale_forward", "dora_scale_backward", "dora_apply", "dora_norm_in_forward", "choose_unmerged",
             "set_dora_inplace_advice", "MAX_FUSED_RANK")
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
_C.set_dora_inplace_advice(DORA_INPLACE_ADVICE)  # the node's message, written once (functions.py)

PATHS = {"auto": _C.PATH_AUTO, "fused": _C.PATH_FUSED, "merged": _C.PATH_MERGED, "addmm": _C.PATH_ADDMM}
# The path the calls of this context run: the cost model's ("auto") unless ``forced_path`` pins one.
_FORCED: contextvars.ContextVar = contextvars.ContextVar("peftkern_cpp_path", default=_C.PATH_AUTO)


@contextlib.contextmanager
def forced_path(name: str) -> Iterator[None]:
    """Run every adapter call inside the block on one path ("auto" restores the cost model).

    A forced path that cannot run for the tensors (fused on bf16, merged on bf16 or with
    dropout) raises ValueError rather than substituting another. The C++ autograd nodes (eager
    mode) run their backward on the path in force at their forward, even when ``backward()`` is
    called after the block; the Python Functions (compiled graphs, DoRA with dropout) read it when
    the backward runs. The two agree bit for bit when both directions run inside one block.
    """
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; valid choices: {', '.join(PATHS)}")
    token = _FORCED.set(PATHS[name])
    try:
        yield
    finally:
        _FORCED.reset(token)


def path_counts() -> Dict[str, int]:
    """{"adapter.forward.fused": calls, ...} for every path that ran since the last reset."""
    return dict(_C.path_counts())


def reset_path_counts() -> None:
    _C.reset_path_counts()


def planned_paths(M: int, N: int, K: int, r: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  dropout: bool = False) -> Tuple[str, str]:
    """(forward, backward) path the cost model picks for an [M, K] input to an N×K layer of rank r."""
    return tuple(_C.planned_paths(M, N, K, r, torch.empty(0, dtype=dtype, device=device), _FORCED.get(), dropout))


def dropout_mask(seed: Tensor, M: int, K: int, p: float, like: Tensor) -> Tensor:
    """This backend's dropout mask for a call with ``seed``: keep[m, k] in {0, 1}, like ``like``."""
    return _C.dropout_mask(int(seed), M, K, p, like)


def adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h):
    y, h, w_eff, _ = _C.adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, int(seed), _FORCED.get())
    # h is needed by a backward that trains B, u or v; with a kept W_eff the backward forms it from x itself
    return y, (h if (save_h and h is not None) else None), w_eff


def traced_adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, seed, save_h):
    """``adapter_forward`` as torch.compile runs it (the custom op): never the merged path, whose outputs
    (no h, W_eff as aux) the op's fake cannot promise, since which path runs depends on the sizes
    (library._adapter_forward). The cost model's unmerged choice, or the path forced."""
    path = _FORCED.get()
    if path == _C.PATH_MERGED:
        raise ValueError("the merged path cannot run under torch.compile (its outputs differ from the other "
                         "paths'); force 'fused' or 'addmm', or 'auto'")
    if path == _C.PATH_AUTO:
        path = _C.choose_unmerged(x, A.shape[0])
    y, h, _, _ = _C.adapter_forward(x, weight, bias, A, B, u, v, scale, dropout, int(seed), path)
    return y, (h if save_h else None), None


def adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, seed, needs):
    grads, _ = _C.adapter_backward(dy, x, weight, A, B, u, v, h, aux, scale, dropout, int(seed), list(needs),
                                   _FORCED.get())
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
    # the op's contract, which its fake states and the torch backend keeps: pre saved in the accumulation
    # dtype (a bf16 pre broke opcheck and the backends' agreement: a review's finding); exact, [L, h] values
    return out, (pre.to(acc_dtype(E.dtype)) if save else None)


def hypernet_backward(dout, E, W1, W2, pre, needs):
    return list(_C.hypernet_backward(dout, E, W1, W2, pre.to(E.dtype), list(needs)))


def dora_scale_forward(z, g, bias):
    # CPU tensors: csrc/cpu/dora.cpp's pass; others (a CUDA build, meta): the torch backend's ATen ops, in C++
    return _C.dora_scale_forward(z, g, bias)


def dora_scale_backward(dy, saved, g, bias, from_output, need_g, need_dz):
    return _C.dora_scale_backward(dy, saved, g, bias, from_output, need_g, need_dz)


def adapter_node(x, weight, bias, A, B, u, v, scale, dropout):
    """The adapter op as one C++ autograd node (csrc/autograd/adapter_node.cpp): the eager path.
    Its dropout seed is AdapterFunction's (``new_seed``), so both draw the same mask."""
    seed = int(new_seed(dropout)) if dropout else 0
    return _C.adapter_apply(x, weight, bias, A, B, u, v, scale, dropout, seed, _FORCED.get())


def dora_node(x, weight, bias, A, B, u, v, m, norm, scale):
    """DoRA without dropout as one C++ autograd node (csrc/autograd/dora_node.cpp): the eager path.
    ``norm`` as ``functions.dora_adapter`` takes it; a provider is asked only where the node needs
    the norm from outside, as DoraFunction asks it (not where the merged path's W_eff gives it)."""
    N, K = weight.shape
    M = x.numel() // K if K else x.shape[:-1].numel()
    path = _FORCED.get()
    folded = dora_folds(M, K, 0.0)
    g = None
    if not callable(norm) or folded or not _C.dora_norm_in_forward(M, N, K, A.shape[0], x, path):
        norm, g = norm_gain(norm, m, x.dtype)
    else:
        norm = None
    return _C.dora_apply(x, weight, bias, A, B, u, v, m, norm, g, scale, folded, path)


KERNELS = register("cpp", {
    "adapter_forward": adapter_forward, "adapter_backward": adapter_backward,
    "shrink_forward": shrink_forward, "shrink_backward": shrink_backward,
    "expand_forward": expand_forward, "expand_backward": expand_backward,
    "hypernet_forward": hypernet_forward, "hypernet_backward": hypernet_backward,
    "dora_scale_forward": dora_scale_forward, "dora_scale_backward": dora_scale_backward,
}, traced={"adapter_forward": traced_adapter_forward})


def _path(N: int, K: int, r: int, dtype) -> str:
    return "fused/merged/addmm, chosen per call"


# --- AdaLoRA's step ops -------------------------------------------------------------------------------

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


def _serves(op: str, tensors: Sequence[Tensor]) -> bool:
    """The compiled step ops take CPU tensors: the importance update of any float dtype, the
    distances float32/float64 (the extension's Gram kernels)."""
    dtypes = (torch.float32, torch.float64) if op == "gram_distances" else (
        torch.float32, torch.float64, torch.bfloat16, torch.float16)
    return all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors)


STEP = StepOps(update_importance=update_importance_, gram_distances=gram_distances, serves=_serves)


# meta: shapes only, on the addmm path (benchmarks/bench_launches.py counts its launches there)
# The fused kernels stream the rank-r term into the base GEMM's output: a base that is not a dense weight
# (a 4-bit layer) has no GEMM to fuse with, and those modules run on the torch backend (registry.py).
BACKEND = Backend.of("cpp", ("cpu",) + (("cuda",) if _C.WITH_CUDA else ()) + ("meta",), KERNELS, path=_path,
                     dropout_mask=dropout_mask, adapter_node=adapter_node, dora_node=dora_node, step=STEP, lowrank_only=False,
                     merged_weight_above_rank=_C.MAX_FUSED_RANK)


def build_info() -> Optional[str]:
    return _C.build_info()
