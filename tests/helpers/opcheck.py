"""A harness every backend's tests use: compare an op with ``peftkern.ops.reference``.

``compare_adapter(ops.adapter, ...)`` runs the op and the reference on the same inputs
and checks the output and every gradient that the configuration asks for, and that
gradients not asked for are not produced. ``gradcheck_adapter`` runs torch.autograd's
fp64 gradcheck. The same helpers exist for shrink/expand and the hypernetwork op.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from peftkern.ops import reference

# (M, K, N, r): odd sizes that are not multiples of any block size, plus M = 1.
ODD_SHAPES = [(1, 5, 3, 1), (37, 123, 45, 4), (19, 33, 70, 16), (2, 16, 16, 8)]

TOLS = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2),
        torch.float16: (3e-3, 3e-3)}


def make_inputs(M, K, N, r, *, dtype=torch.float32, device="cpu", bias=True, u=True, v=True,
                trained="xABuv", lead=(), seed=0) -> Dict[str, Optional[torch.Tensor]]:
    """Random inputs; names in ``trained`` get requires_grad (x is 'x')."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    t = {
        "x": rnd(*lead, M, K),
        "weight": rnd(N, K, scale=max(K, 1) ** -0.5),
        "bias": rnd(N) if bias else None,
        "A": rnd(r, K, scale=max(K, 1) ** -0.5),
        "B": rnd(N, r, scale=max(r, 1) ** -0.5),
        "u": (1 + 0.5 * rnd(r)) if u else None,
        "v": (1 + 0.5 * rnd(N)) if v else None,
    }
    for name in ("x", "A", "B", "u", "v"):
        if t[name] is not None and (name if name != "x" else "x") in trained:
            t[name].requires_grad_(True)
    return t


NORM_TOLS = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def assert_close(actual, expected, dtype, tol=None, what=""):
    """Elementwise closeness for fp32/fp64; normwise relative error for bf16/fp16, where
    elementwise checks are dominated by cancellation near zero."""
    if dtype in NORM_TOLS and tol is None:
        err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
        assert err < NORM_TOLS[dtype], f"{what}: normwise relative error {err:.3g} >= {NORM_TOLS[dtype]}"
        return
    rtol, atol = tol or TOLS[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def _clone(t):
    return {k: (None if v is None else v.detach().clone().requires_grad_(v.requires_grad)) for k, v in t.items()}


DROPOUT_SEED = 1234


def dropout_keep(mask: Callable, dropout: float, M: int, K: int, like):
    """The mask an op drew for a call made right after ``torch.manual_seed(DROPOUT_SEED)``."""
    from peftkern.ops.functions import new_seed

    torch.manual_seed(DROPOUT_SEED)
    return mask(new_seed(dropout), M, K, dropout, like)


def compare_adapter(op: Callable, M, K, N, r, *, dtype=torch.float32, device="cpu", scale=0.7, bias=True,
                    u=True, v=True, trained="xABuv", lead=(), tol=None, ref_dtype=None, dropout=0.0,
                    mask: Optional[Callable] = None):
    """Check op(...) against the reference: output and the gradient of every trained input.

    With ``dropout``, the op runs right after ``torch.manual_seed(DROPOUT_SEED)`` and the
    reference applies the mask ``mask(seed, ...)`` (the backend's dropout_mask) says it drew."""
    ref_dtype = ref_dtype or (torch.float64 if dtype != torch.float64 else dtype)
    inp = make_inputs(M, K, N, r, dtype=dtype, device=device, bias=bias, u=u, v=v, trained=trained, lead=lead)
    ref_inp = {k: (None if t is None else t.detach().to(ref_dtype).requires_grad_(t.requires_grad))
               for k, t in inp.items()}
    args = [inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    ref_args = [ref_inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    if dropout:
        torch.manual_seed(DROPOUT_SEED)
        y = op(*args, scale, dropout)
        rows = inp["x"].reshape(-1, K).shape[0]
        keep = dropout_keep(mask, dropout, rows, K, inp["x"]).to(ref_dtype).view(inp["x"].shape)
        assert 0 < float(keep.mean()) < 1 or rows * K < 20, "a dropout mask that keeps all or nothing"
        y_ref = reference.adapter_with_dropout(*ref_args, scale, keep, dropout)
    else:
        y = op(*args, scale)
        y_ref = reference.adapter(*ref_args, scale)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close(y, y_ref, dtype, tol, "forward")
    if not y_ref.requires_grad:  # nothing trained in this configuration
        assert not y.requires_grad
        return y
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(gy.to(device=device, dtype=dtype))
    y_ref.backward(gy.to(device=device, dtype=ref_dtype))
    for name in ("x", "A", "B", "u", "v"):
        t = inp[name]
        if t is None:
            continue
        if t.requires_grad:
            assert t.grad is not None, f"no gradient for trained {name}"
            assert_close(t.grad, ref_inp[name].grad, dtype, tol, f"grad {name}")
        else:
            assert t.grad is None
    return y


def gradcheck_adapter(op: Callable, M=3, K=5, N=4, r=2, *, device="cpu", bias=True, u=True, v=True,
                      trained="xABuv") -> bool:
    inp = make_inputs(M, K, N, r, dtype=torch.float64, device=device, bias=bias, u=u, v=v, trained=trained)
    names = ["x", "weight", "bias", "A", "B", "u", "v"]
    args = [inp[n] for n in names]
    return torch.autograd.gradcheck(lambda *a: op(*a, 0.7), args, eps=1e-6, atol=1e-7)


def compare_joint(shrink: Callable, expand: Callable, M, K, Ns: Sequence[int], r, *, dtype=torch.float32,
                  device="cpu", scale=0.7, u=True, v=True, tol=None):
    """Joint QKV: one shrink, several expands, all gradients, against the reference."""
    g = torch.Generator().manual_seed(3)

    def rnd(*s, scale_=1.0, grad=True):
        return (torch.randn(*s, generator=g) * scale_).to(device=device, dtype=dtype).requires_grad_(grad)

    x, A = rnd(M, K), rnd(r, K, scale_=max(K, 1) ** -0.5)
    uu = (1 + 0.5 * rnd(r, grad=False)).requires_grad_(True) if u else None
    Ws = [rnd(n, K, scale_=max(K, 1) ** -0.5, grad=False) for n in Ns]
    bs = [rnd(n, grad=False) for n in Ns]
    Bs = [rnd(n, r, scale_=max(r, 1) ** -0.5) for n in Ns]
    vs = [(1 + 0.5 * rnd(n, grad=False)).requires_grad_(True) if v else None for n in Ns]
    leaves = [x, A, uu, *Bs, *vs]

    def run(fn_shrink, fn_expand, ts):
        x_, A_, u_, *rest = ts
        B_, v_ = rest[:len(Ns)], rest[len(Ns):]
        hu = fn_shrink(x_, A_, u_)
        return [fn_expand(x_, W, b, hu, Bi, vi, scale) for W, b, Bi, vi in zip(Ws_, bs_, B_, v_)]

    ref_leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in leaves]
    Ws_, bs_ = Ws, bs
    ys = run(shrink, expand, leaves)
    Ws_, bs_ = [w.detach().double() for w in Ws], [b.detach().double() for b in bs]
    ys_ref = run(reference.shrink, reference.expand, ref_leaves)
    for y, yr in zip(ys, ys_ref):
        assert_close(y, yr, dtype, tol, "forward")
    gys = [torch.randn(yr.shape, dtype=torch.float64) for yr in ys_ref]
    torch.autograd.backward(ys, [gy.to(dtype) for gy in gys])
    torch.autograd.backward(ys_ref, gys)
    for i, (t, tr) in enumerate(zip(leaves, ref_leaves)):
        if t is not None:
            assert_close(t.grad, tr.grad, dtype, tol, f"grad of leaf {i}")


def compare_hypernet(op: Callable, L, h_in, h2, P, *, dtype=torch.float32, device="cpu", tol=None):
    g = torch.Generator().manual_seed(5)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)

    ts = [rnd(L, h_in), rnd(h2, h_in, scale=h_in ** -0.5), rnd(h2), rnd(P, h2, scale=h2 ** -0.5), rnd(P)]
    refs = [t.detach().double().requires_grad_(True) for t in ts]
    out, ref = op(*ts), reference.hypernet(*refs)
    assert_close(out, ref, dtype, tol, "forward")
    gy = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(gy.to(dtype))
    ref.backward(gy)
    for name, t, tr in zip(("E", "W1", "b1", "W2", "b2"), ts, refs):
        assert_close(t.grad, tr.grad, dtype, tol, f"grad {name}")


def saved_numels(op: Callable, M=37, K=23, N=29, r=4, **kw) -> list:
    """Numel of every tensor the op's autograd graph saves (to check no M×N intermediate is kept)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    inp = make_inputs(M, K, N, r, **kw)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(inp["x"], inp["weight"], inp["bias"], inp["A"], inp["B"], inp["u"], inp["v"], 0.5)
    return sizes


def compare_hypernet_trained(op: Callable, trained: str):
    """The hypernet op with only the inputs named in ``trained`` (E, W1, b1, W2, b2) requiring grad:
    output and those gradients equal the reference, and no other gradient is produced."""
    g = torch.Generator().manual_seed(4)
    names = ("E", "W1", "b1", "W2", "b2")
    shapes = {"E": (9, 6), "W1": (20, 6), "b1": (20,), "W2": (33, 20), "b2": (33,)}
    ts = {n: torch.randn(*shapes[n], generator=g).requires_grad_(n in trained) for n in names}
    refs = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in ts.items()}
    out, ref = op(*(ts[n] for n in names)), reference.hypernet(*(refs[n] for n in names))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    out.backward(gy.float())
    ref.backward(gy)
    for n in names:
        if n in trained:
            torch.testing.assert_close(ts[n].grad.double(), refs[n].grad, rtol=2e-5, atol=2e-5)
        else:
            assert ts[n].grad is None


def available_backend(name: str):
    """The backend ``name`` if it runs CPU tensors here (triton only under the interpreter), else None."""
    from peftkern.ops import registry

    if name == "triton" and registry.unavailable("triton", "cpu"):
        return None
    try:
        return registry.load(name)
    except registry.BackendUnavailable:
        return None
