"""The adapter's ops as autograd Functions (adapter, shrink/expand, hypernet, DoRA, the 4-bit adapter): one
wrapper per op, for every backend.

Each wrapper does what is the same on every backend, once: flatten x to [M, K], read
``needs_input_grad``, ask the forward kernel for exactly what the backward will need,
save it (never an M×N tensor, and x only when a gradient reads it), call the backend's
backward kernel and turn its placeholders back into None, view the result back to x's
shape. The kernels themselves (``backend.py``'s contract) are per backend; in eager mode
they are called directly, under torch.compile as ``torch.library`` custom ops
(``library.py``), so a compiled model has no graph break here.

Math (peftkern/ops/reference.py is the truth; Tied-LoRA eq. (1), LEFT's γ):

    adapter   y  = x·W0ᵀ + b + s·(v ⊙ (B·(u ⊙ (A·D(x)))))     [..., N]
    shrink    hu = u ⊙ (A·D(x))                                [..., r]   (joint QKV: one per layer)
    expand    y  = x·W0ᵀ + b + s·(v ⊙ (B·hu))                  [..., N]
    hypernet  out = GeLU(E·W1ᵀ + b1)·W2ᵀ + b2                  [L, P]
    dora      y  = g ⊙ (x·W0ᵀ + x·ΔWᵀ) + b, g = m/‖W0 + ΔW‖_row  [..., N]   (with dropout PEFT's formula)
    4-bit     adapter with W0 a bitsandbytes 4-bit weight, read packed             (optional kernels)

D is inverted dropout with probability ``dropout`` (PEFT's lora_dropout): each element
of the adapter's input is zeroed with probability p and the rest scaled by 1/(1-p). The
mask comes from a per-call seed and is regenerated in the backward, so it is never
stored. Pass ``dropout=0`` in eval (AdaptedLinear does).

First derivatives only: every backward is once-differentiable (``first_order_only``), so
differentiating a gradient again (``create_graph=True``, then another backward) raises
instead of returning a wrong second derivative (the saved h is computed without a graph).
Outputs are not differentiable views (``_shaped``), so a model may modify them in place as
it may nn.Linear's.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .backend import Backend

Tensor = torch.Tensor

_NO_SEED = torch.zeros(1, dtype=torch.int64)


def new_seed(dropout: float) -> Tensor:
    """A fresh dropout seed from torch's default CPU generator (so ``torch.manual_seed`` makes
    masks reproducible); a constant when there is no dropout. Never a device sync."""
    if not dropout:
        return _NO_SEED
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)


def _seed(saved: Optional[Tensor]) -> Tensor:
    return _NO_SEED if saved is None else saved  # only calls with dropout save their seed


def _given(t: Optional[Tensor]) -> Optional[Tensor]:
    """A kernel's optional output: None in eager mode, a 1-D empty placeholder from a custom op
    (library._none). Every real optional output is 2-D, so an [0, r] h (no tokens) is kept."""
    return None if t is None or (t.dim() == 1 and t.numel() == 0) else t


def _rows(t: Tensor, width: int) -> Tensor:
    """t [..., width] as [M, width]. ``reshape(-1, 0)`` cannot infer M (0 elements fit any M),
    so a zero width (a layer with no input or output features) computes it."""
    return t.reshape(-1, width) if width else t.reshape(t.shape[:-1].numel(), 0)


def _grads(values: List[Optional[Tensor]], needs) -> List[Optional[Tensor]]:
    return [t if n else None for t, n in zip(values, needs)]


def first_order_only(backward):
    """``once_differentiable`` where it matters, and free elsewhere: a backward runs with grad
    mode on only under ``create_graph=True``, and only then is it wrapped (torch's wrapper costs
    a few µs on every call, measured). Differentiating its gradients again then raises."""
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        return guarded(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)
    return wrapper


def _shaped(t2: Tensor, x: Tensor) -> Tensor:
    """A Function's 2-D output [M, ·] with x's leading dims, as a tensor of the Function's own.
    A plain view made inside a Function may not be modified in place (autograd refuses), and a
    model may do ``y += ...`` on a projection's output as on nn.Linear's; a detached view is not
    a differentiable view, so it may. It cost ~1.5 µs per call, where a view outside the
    Function cost ~4 µs and ``_unsafe_view`` inside ~12 µs (a one-off measurement with a toy
    Function on the 2-core CPU VM; bench_module_host.py measures the whole module)."""
    return t2 if x.dim() == 2 else t2.view(*x.shape[:-1], t2.shape[-1]).detach()


def check_dropout(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


class AdapterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, u, v, scale, dropout, backend):
        x2 = _rows(x, A.shape[1])
        _, need_w, _, need_A, need_B, need_u, need_v = ctx.needs_input_grad[:7]
        want_h = need_B or need_u or need_v  # Gt and du read h; dx and dA do not
        seed = new_seed(dropout)
        y, h, aux = backend.adapter_forward(x2, weight, bias, A, B, u, v, scale, dropout, seed, want_h)
        h, aux = _given(h), _given(aux)
        keep_x = need_A or need_w or (want_h and h is None)  # a backend that saved no h recomputes it from x
        ctx.save_for_backward(x2 if keep_x else None, weight, A, B, u, v, h, aux, seed if dropout else None)
        ctx.scale, ctx.dropout, ctx.backend, ctx.x_shape = scale, dropout, backend, x.shape
        return _shaped(y, x)

    @staticmethod
    @first_order_only
    def backward(ctx, gy):
        x2, weight, A, B, u, v, h, aux, seed = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:7])
        g = _rows(gy, B.shape[0])
        grads = _grads(ctx.backend.adapter_backward(g, x2, weight, A, B, u, v, h, aux, ctx.scale, ctx.dropout,
                                                    _seed(seed), needs), needs)
        if grads[0] is not None:
            grads[0] = grads[0].view(ctx.x_shape)
        return (*grads, None, None, None)


class ShrinkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, u, dropout, backend):
        x2 = _rows(x, x.shape[-1])
        _, need_A, need_u = ctx.needs_input_grad[:3]
        seed = new_seed(dropout)
        hu, h = backend.shrink_forward(x2, A, u, dropout, seed, need_u)
        ctx.save_for_backward(x2 if need_A else None, A, u, _given(h) if need_u else None, seed if dropout else None)
        ctx.dropout, ctx.backend, ctx.x_shape = dropout, backend, x.shape
        return _shaped(hu, x)

    @staticmethod
    @first_order_only
    def backward(ctx, dhu):
        x2, A, u, h, seed = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        grads = _grads(ctx.backend.shrink_backward(_rows(dhu, A.shape[0]), x2, A, u, h, ctx.dropout,
                                                   _seed(seed), needs), needs)
        if grads[0] is not None:
            grads[0] = grads[0].view(ctx.x_shape)
        return (*grads, None, None)


class ExpandFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, hu, B, v, scale, backend):
        x2 = _rows(x, weight.shape[1])
        hu2 = _rows(hu, hu.shape[-1])
        _, need_w, _, _, need_B, need_v = ctx.needs_input_grad[:6]
        y = backend.expand_forward(x2, weight, bias, hu2, B, v, scale)
        ctx.save_for_backward(x2 if need_w else None, weight, hu2, B, v)
        ctx.scale, ctx.backend, ctx.x_shape, ctx.hu_shape = scale, backend, x.shape, hu.shape
        return _shaped(y, x)

    @staticmethod
    @first_order_only
    def backward(ctx, gy):
        x2, weight, hu2, B, v = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:6])
        g = _rows(gy, weight.shape[0])
        grads = _grads(ctx.backend.expand_backward(g, x2, weight, hu2, B, v, ctx.scale, needs), needs)
        if grads[0] is not None:
            grads[0] = grads[0].view(ctx.x_shape)
        if grads[3] is not None:
            grads[3] = grads[3].view(ctx.hu_shape)
        return (*grads, None, None)


class HypernetFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, E, W1, b1, W2, b2, backend):
        need = any(ctx.needs_input_grad[:5])
        out, pre = backend.hypernet_forward(E, W1, b1, W2, b2, need)
        ctx.save_for_backward(E, W1, W2, _given(pre) if need else None)
        ctx.backend = backend
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, dout):
        E, W1, W2, pre = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        return (*_grads(ctx.backend.hypernet_backward(dout.contiguous(), E, W1, W2, pre, needs), needs), None)


# DoRA's column scale folded into the weight when the tokens are many: g⊙(W0·x + s·v⊙B·(u⊙A·x)) =
# (g⊙W0)·x + s·(g⊙v)⊙B·(u⊙A·x), so the adapter's own kernels compute y with no [M, N] pass, and its
# backward takes dy itself (dx = dy·(g⊙W0)) with no dz. Each direction then forms g⊙W0, an [N, K]
# pass, in place of [M, N] passes (the forward's in-place scale; the backward's write of dz, kept:
# its read for dg). Counting elements moved, forward 2NK against 2MN, backward 2NK against MN:
# both gain once M ≥ 2K, the rule below (DoraFunction).
FOLD_MIN_ROWS_PER_FEATURE = 2


def dora_folds(M: int, K: int, dropout: float) -> bool:
    """Whether DoRA folds its column scale into W0 and v for an [M, K] input (the comment above).
    Never with dropout, whose PEFT formula applies W0 to the undropped x."""
    return not dropout and M >= FOLD_MIN_ROWS_PER_FEATURE * K


def dora_keep(x: Tensor, p: float) -> Tensor:
    """DoRA's dropout mask for x (bool, x's shape): drawn as nn.Dropout draws it, from the global generator, so
    that every DoRA path (dense, and the layer's with the base apart) gives one seed the same mask."""
    return torch.rand_like(x) >= p


class DoraFunction(torch.autograd.Function):
    """DoRA on any backend's kernels (``dora_adapter``). Two routes without dropout, picked by
    ``dora_folds``; both save y and read dm from it in one pass over dy and y (the norm a constant,
    DoRA §4.3):
      - folded (many tokens): g is folded into W0 and v (into B without v), y = adapter(x; g⊙W0, b, A, B, u, g⊙v), and
        the backward's pass gives dm = Σ_m dy⊙(y − b)/m directly (``_folded_backward``), then runs the
        adapter's backward on dy with g⊙W0 formed again (dW0 and dv scaled back by g);
      - scaled: the adapter forward's z = W0·x + ΔW·x (no bias) is scaled in place, y = g⊙z + b,
        and the backward's one pass over dy gives dz = dy⊙g with dg = Σ_m dy⊙(y − b)/g, then
        dm = dg / norm; the adapter backward runs on dz.
    With dropout (training), PEFT's formula y = g⊙(W0·D(x) + ΔW·D(x)) + b + W0·(x − D(x)): D(x)
    is formed (the mask drawn like nn.Dropout's, kept as bool), z is saved, and a second base GEMM
    adds W0·(x − D(x)), as PEFT's own DoRA does.

    ``norm`` is ‖W0 + ΔW‖_row [N], or a callable that returns it: it is called only when the
    backend did not hand back the merged weight W_eff = W0 + ΔW (``Backend.merged_weight_above_rank``),
    whose row norms are the norm for an [N, K] pass instead of the expansion's [N, K]·[K, r] product."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, u, v, m, norm, scale, dropout, backend):
        x2 = _rows(x, weight.shape[1])
        need_x, need_w, _, need_A, need_B, need_u, need_v, need_m = ctx.needs_input_grad[:8]
        want_h = need_B or need_u or need_v
        keep = None
        xd = x2
        if dropout:
            keep = dora_keep(x2, dropout)
            xd = x2 * keep / (1.0 - dropout)
        folded = dora_folds(x2.shape[0], x2.shape[1], dropout)
        if folded:
            norm, g = norm_gain(norm, m, x2.dtype)  # before the GEMM: g is in its weight
            # g rides on B itself when there is no v (LoRA): the backward reads g⊙B as the forward
            # did, and scales dB by g, one launch fewer than scaling B and the gradient by a v = g
            B, v = (B * g[:, None], None) if v is None else (B, v * g)
            y, h, aux = backend.adapter_forward(x2, weight * g[:, None], bias, A, B, u, v, scale, 0.0, _NO_SEED,
                                                want_h)
            h, aux = _given(h), _given(aux)
            saved = y if need_m else None
        else:
            z, h, aux = backend.adapter_forward(xd, weight, None, A, B, u, v, scale, 0.0, _NO_SEED, want_h)
            h, aux = _given(h), _given(aux)
            if callable(norm) and aux is not None and backend.merged_weight_above_rank is not None:
                norm = torch.linalg.vector_norm(aux, dim=1).detach()
            norm, g = norm_gain(norm, m, x2.dtype)
            if keep is None:
                y = backend.dora_scale_forward(z, g, bias)
                saved = y if need_m else None
            else:
                saved = z if need_m else None
                y = backend.dora_scale_forward(z.clone() if need_m else z, g, bias)
                y = y.addmm_(x2 - xd, weight.t())
        keep_x = need_A or need_w or (want_h and h is None) or keep is not None
        # the folded backward divides by m itself, in m's dtype (_folded_backward), the scaled one by the norm
        last = m.detach() if folded else norm
        ctx.save_for_backward(x2 if keep_x else None, weight, A, B, u, v, h, aux, g, bias, saved, keep, last)
        ctx.scale, ctx.dropout, ctx.backend, ctx.x_shape, ctx.m_dtype = scale, dropout, backend, x.shape, m.dtype
        ctx.folded = folded
        ctx.v_given = v is not None  # the folded route's v is g⊙v, or None with g⊙B in B
        return _shaped(y, x)

    @staticmethod
    @first_order_only
    def backward(ctx, gy):
        x2, weight, A, B, u, v, h, aux, g, bias, saved, keep, last = _dora_saved(ctx)
        need_x, need_w, need_b, need_A, need_B, need_u, need_v, need_m = ctx.needs_input_grad[:8]
        dy = _rows(gy, weight.shape[0])
        if ctx.folded:
            return DoraFunction._folded_backward(ctx, dy, x2, weight, A, B, u, v, h, aux, g, bias, saved, last)
        norm = last
        dz, dg = ctx.backend.dora_scale_backward(dy, saved if saved is not None else dy, g, bias,
                                                 keep is None, need_m, True)
        p = ctx.dropout
        xd = x2 if keep is None or x2 is None else x2 * keep / (1.0 - p)
        needs = [need_x, need_w, False, need_A, need_B, need_u, need_v]
        grads = _grads(ctx.backend.adapter_backward(dz, xd, weight, A, B, u, v, h, aux, ctx.scale, 0.0, _NO_SEED,
                                                    needs), needs)
        dx, dw, _, dA, dB, du, dv = grads
        if keep is not None:  # y also holds W0·(x − D(x))
            if need_x:
                base = dy @ weight
                dx = base + (dx - base) * keep / (1.0 - p)
            if need_w:
                dw = dw + dy.t() @ (x2 - xd)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        db = dy.sum(0).to(weight.dtype) if need_b else None
        dm = ratio(dg, norm, ctx.m_dtype) if need_m else None  # [N] from every backend, [0] when N = 0
        return dx, dw, db, dA, dB, du, dv, dm, None, None, None, None

    @staticmethod
    def _folded_backward(ctx, dy, x2, weight, A, B, u, v, h, aux, g, bias, saved, m):
        """The folded route's backward: dm by a read of dy and y (no dz), then the adapter's backward
        on dy with g⊙W0 and the forward's g⊙v (or g⊙B, ``B`` here, when there is no v), whose dW0
        and dv (dB) are g times the gradients it gives.

        dm = Σ_rows dy⊙z / norm with z = (y − b)/g, and g·norm = m: so the scale pass divides by m
        itself, in m's dtype (fp32 on a half model: the pass reads the wider g and writes dm in it),
        and gives dm, with no cast of m either way and two launches fewer than dg then dg/norm. g is
        m/norm rounded to y's dtype, so this differs from dg/norm by that one rounding (2⁻⁹ in bf16;
        2⁻²⁴ in fp32)."""
        need_x, need_w, need_b, need_A, need_B, need_u, need_v, need_m = ctx.needs_input_grad[:8]
        dm = None
        if need_m:
            _, dm = ctx.backend.dora_scale_backward(dy, saved, m, bias, True, True, False)
        needs = [need_x, need_w, False, need_A, need_B, need_u, need_v]
        grads = _grads(ctx.backend.adapter_backward(
            dy, x2, weight * g[:, None] if need_x or need_w else weight, A, B, u, v, h, aux,
            ctx.scale, 0.0, _NO_SEED, needs), needs)
        dx, dw, _, dA, dB, du, dv = grads
        dx = None if dx is None else dx.view(ctx.x_shape)
        dw = None if dw is None else dw * g[:, None]
        if ctx.v_given:
            dv = None if dv is None else dv * g
        else:
            dB = None if dB is None else dB * g[:, None]
        db = dy.sum(0).to(weight.dtype) if need_b else None
        return dx, dw, db, dA, dB, du, dv, dm, None, None, None, None


# What an in-place edit of a tensor DoRA saved means, and what to do (said by DoraFunction here and by
# the C++ node, which the cpp backend hands this text when it loads).
DORA_INPLACE_ADVICE = (
    "DoRA: a tensor this DoRA module saved for its backward was modified in place after its forward. "
    "Most likely its output (e.g. `q /= c`, `out.mul_(...)`, or a forward hook editing the output in "
    "place): DoRA keeps that output for its magnitude's gradient (dm = sum over tokens of dy * (y - b) / g), "
    "so make the edit out of place (`q = q / c`) or clone the output first; else one of its factors or "
    "magnitudes, changed in place between the forward and the backward.")


def _dora_saved(ctx) -> tuple:
    """``ctx.saved_tensors``, where an in-place edit of the saved output y (torch's version check) is
    explained in DoRA's terms (``DORA_INPLACE_ADVICE``)."""
    try:
        return ctx.saved_tensors
    except RuntimeError as exc:
        if "modified by an inplace operation" not in str(exc):
            raise
        raise RuntimeError(f"{DORA_INPLACE_ADVICE} torch said: {exc}") from exc


def ratio(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a / b computed in their promoted dtype (the norm's: fp32 at least) and rounded once to ``dtype``,
    in one kernel: the division writes ``dtype`` itself (a launch fewer than a division, then .to)."""
    return torch.div(a, b, out=torch.empty(b.shape, dtype=dtype, device=b.device))


def norm_gain(norm, m: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(the detached norm, g = m / norm in ``dtype``) from ``dora_adapter``'s ``norm``: a tensor, or a
    provider returning the norm or (norm, g), as ``Magnitudes.gain`` does from its cache."""
    got = norm() if callable(norm) else norm
    if isinstance(got, tuple):
        return got
    got = _gain(got)
    return got, ratio(m.detach(), got, dtype)


def _gain(norm: Tensor) -> Tensor:
    """The detached norm in the dtype g is formed in: fp32 at least (the division promotes to m's
    dtype if wider). Decided on the host: torch.promote_types would be one more dispatched op."""
    norm = norm.detach()
    return norm if norm.dtype.itemsize >= 4 else norm.float()


class Adapter4bitFunction(torch.autograd.Function):
    """The adapter over a bitsandbytes 4-bit W0 in one kernel each way (``adapter_4bit``). W0 is frozen
    and stays packed: the backward reads the same packed state for dx = dy·W0 + D'(dh·A)."""

    @staticmethod
    def forward(ctx, x, bias, A, B, u, v, scale, dropout, backend, w4):
        x2 = _rows(x, A.shape[1])
        _, _, need_A, need_B, need_u, need_v = ctx.needs_input_grad[:6]
        want_h = need_B or need_u or need_v
        seed = new_seed(dropout)
        y, h = backend.adapter_4bit_forward(x2, *w4, bias, A, B, u, v, scale, dropout, seed, want_h)
        h = _given(h)
        ctx.save_for_backward(x2 if need_A or (want_h and h is None) else None, A, B, u, v, h,
                              seed if dropout else None, *w4[:6])
        ctx.w4_rest, ctx.scale, ctx.dropout, ctx.backend, ctx.x_shape = w4[6:], scale, dropout, backend, x.shape
        return _shaped(y, x)

    @staticmethod
    @first_order_only
    def backward(ctx, gy):
        x2, A, B, u, v, h, seed, *w4 = ctx.saved_tensors
        need_x, _, need_A, need_B, need_u, need_v = ctx.needs_input_grad[:6]
        needs = [need_x, need_A, need_B, need_u, need_v]
        dx, dA, dB, du, dv = _grads(ctx.backend.adapter_4bit_backward(
            _rows(gy, B.shape[0]), x2, *w4, *ctx.w4_rest, A, B, u, v, h, ctx.scale, ctx.dropout, _seed(seed), needs),
            needs)
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, None, dA, dB, du, dv, None, None, None, None


def adapter_4bit(x: Tensor, w4: tuple, bias: Optional[Tensor], A: Tensor, B: Tensor, u: Optional[Tensor],
                 v: Optional[Tensor], scale: float, dropout: float = 0.0, *, backend: Backend) -> Tensor:
    """``adapter`` with W0 a bitsandbytes 4-bit weight (QLoRA), on a backend that ``fuses_4bit``:
    w4 = (packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, compute_dtype, weight_dtype),
    bitsandbytes' state of W0 [N, K] (``quant.packed_4bit``; absmax2, code2, offset None without double
    quantization; compute_dtype the layer's, or None for x's; weight_dtype the one W0 was quantized from).
    x [..., K], A, B, u, v in one dtype (the adapter's, as ``adapter``), bias [N] or None in the compute
    dtype; returns [..., N] in x's dtype, whose base part W0·x + b rounds as bitsandbytes' ``matmul_4bit``
    (in the compute dtype). Gradients flow to x and the factors, never to W0 or the bias (frozen)."""
    return Adapter4bitFunction.apply(x, bias, A, B, u, v, float(scale), float(dropout), backend, tuple(w4))


def dora_adapter(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, u: Optional[Tensor],
                 v: Optional[Tensor], m: Tensor, norm, scale: float, dropout: float = 0.0, *,
                 backend: Backend) -> Tensor:
    """DoRA (Liu et al. 2024, eq. 5): y = g⊙(W0·x + s·Λv·B·Λu·A·x) + b, g = m / ‖W0 + ΔW‖_row, the norm
    a constant in the backward (§4.3; m gets the gradient). With dropout in training, PEFT's formula
    (``reference.dora_adapter``). Shapes as ``adapter``, plus m [N] (any float dtype; its gradient in
    it) and ``norm``: ‖W0 + ΔW‖_row [N] (``dora.weight_norm``), or a zero-argument callable returning it
    (or the pair (norm, g = m / norm in x's dtype), as ``Magnitudes.gain`` does from its cache),
    called only when the backend's forward did not form W_eff = W0 + ΔW itself (the C++ merged path
    at ranks above 32 does; its row norms then serve, exact to the rounding of W_eff) or when g is
    folded into W0 (``dora_folds``: it is needed before the GEMM). Returns
    [..., N] in x's dtype. The output is saved for the backward: modifying it in place makes the
    backward raise (torch's version check), where ``adapter``'s output may be modified.

    In eager mode without dropout a backend with a ``dora_node`` (the cpp backend) runs the op as
    one C++ autograd node (csrc/autograd/dora_node.cpp) instead of ``DoraFunction``: the same
    kernels, routes and saved tensors, without Python in the forward or the backward."""
    if torch.compiler.is_compiling():
        if callable(norm):  # a custom op's fake aux promises no W_eff
            norm = norm()
            norm = norm[0] if isinstance(norm, tuple) else norm
    elif backend.dora_node is not None and not dropout:
        return backend.dora_node(x, weight, bias, A, B, u, v, m, norm, float(scale))
    return DoraFunction.apply(x, weight, bias, A, B, u, v, m, norm, float(scale), float(dropout), backend)


def adapter(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, u: Optional[Tensor],
            v: Optional[Tensor], scale: float, dropout: float = 0.0, *, backend: Backend) -> Tensor:
    """y = x·W0ᵀ + b + s·(v ⊙ (B·(u ⊙ (A·D(x))))): Tied-LoRA eq. (1) with PEFT's lora_dropout.

    Shapes: x [..., K], weight [N, K] (Linear layout; a Conv1D passes its weight's
    transpose view), bias [N] or None, A [r, K], B [N, r], u [r] or None (identity),
    v [N] or None (identity); returns [..., N] in x's dtype. Every tensor must share x's
    device and dtype: the cpp and triton backends raise TypeError/ValueError naming the operand
    that does not, the torch backend torch's own error (an adapted layer checks its input and
    casts its factors before it gets here). ``dropout`` is a probability in [0, 1); ``scale``
    is s = α/r.

    ``weight`` None (a backend that declares ``lowrank_only``): the low-rank term alone, for a base
    computed elsewhere (a 4-bit layer).

    In eager mode a backend with an ``adapter_node`` (the cpp backend) runs the whole op as one
    C++ autograd node (csrc/autograd/adapter_node.cpp) instead of ``AdapterFunction``: the same
    kernels and saved tensors, without Python in the forward or the backward.
    """
    node = backend.adapter_node
    if node is not None and weight is not None and not torch.compiler.is_compiling():  # compiled: the custom ops
        return node(x, weight, bias, A, B, u, v, float(scale), float(dropout))
    return AdapterFunction.apply(x, weight, bias, A, B, u, v, float(scale), float(dropout), backend)


def shrink(x: Tensor, A: Tensor, u: Optional[Tensor], dropout: float = 0.0, *, backend: Backend) -> Tensor:
    """hu = u ⊙ (A·D(x)): x [..., K], A [r, K], u [r] or None -> [..., r] (the joint-QKV down-projection)."""
    return ShrinkFunction.apply(x, A, u, float(dropout), backend)


def expand(x: Tensor, weight: Tensor, bias: Optional[Tensor], hu: Tensor, B: Tensor, v: Optional[Tensor],
           scale: float, *, backend: Backend) -> Tensor:
    """y = x·W0ᵀ + b + s·(v ⊙ (B·hu)): x [..., K], hu [..., r] from ``shrink``, B [N, r], v [N] or None -> [..., N]."""
    return ExpandFunction.apply(x, weight, bias, hu, B, v, float(scale), backend)


def hypernet(E: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, *, backend: Backend) -> Tensor:
    """LEFT's γ for all layers at once: E [L, h_in], W1 [h2, h_in], b1 [h2], W2 [P, h2], b2 [P] -> [L, P]
    (exact erf GeLU, every operand in E's dtype)."""
    return HypernetFunction.apply(E, W1, b1, W2, b2, backend)


class BoundOps:
    """The ops with ``backend`` filled in: ``BoundOps(load("cpp")).adapter(x, W, b, A, B, u, v, s)``."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name

    def adapter(self, x, weight, bias, A, B, u, v, scale, dropout=0.0):
        return adapter(x, weight, bias, A, B, u, v, scale, dropout, backend=self.backend)

    def shrink(self, x, A, u, dropout=0.0):
        return shrink(x, A, u, dropout, backend=self.backend)

    def expand(self, x, weight, bias, hu, B, v, scale):
        return expand(x, weight, bias, hu, B, v, scale, backend=self.backend)

    def hypernet(self, E, W1, b1, W2, b2):
        return hypernet(E, W1, b1, W2, b2, backend=self.backend)

    def dora_adapter(self, x, weight, bias, A, B, u, v, m, norm, scale, dropout=0.0):
        return dora_adapter(x, weight, bias, A, B, u, v, m, norm, scale, dropout, backend=self.backend)

    def adapter_4bit(self, x, w4, bias, A, B, u, v, scale, dropout=0.0):
        return adapter_4bit(x, w4, bias, A, B, u, v, scale, dropout, backend=self.backend)


__all__ = ["BoundOps", "adapter", "adapter_4bit", "dora_adapter", "shrink", "expand", "hypernet", "new_seed", "check_dropout",
           "AdapterFunction", "Adapter4bitFunction", "DoraFunction", "ShrinkFunction", "ExpandFunction", "HypernetFunction"]
