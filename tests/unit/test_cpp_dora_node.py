"""The cpp backend's eager DoRA is one C++ autograd node (csrc/autograd/dora_node.cpp).

test_dora_ops.py checks DoRA against the reference and PEFT on every backend (on cpp it runs
this node wherever there is no dropout). Here: that the node is what runs, that it equals the
Python DoraFunction that torch.compile traces and dropout takes bit for bit (same kernels, same
saved tensors) on both routes and every C++ path, that it asks the norm provider exactly when the
Function does, fp64 gradcheck, and its errors.
"""
import os

import pytest
import torch

from tests.helpers import opcheck

if os.environ.get("PEFTKERN_NO_EXT") == "1":
    pytest.skip("installed with PEFTKERN_NO_EXT=1: no C++ extension", allow_module_level=True)

from peftkern import dora  # noqa: E402
from peftkern.ops import functions  # noqa: E402
from peftkern.ops.backends import cpp as cb  # noqa: E402

NAMES = ("x", "weight", "bias", "A", "B", "u", "v")


def _inputs(M, K, N, r, dtype=torch.float32, bias=True, uv=True, trained="xABuv", m_trained=True, lead=(2,),
            seed=0, m_dtype=None):
    t = opcheck.make_inputs(M, K, N, r, dtype=dtype, bias=bias, u=uv, v=uv, trained=trained, lead=lead, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained adapter: B ≠ 0
        t["B"].copy_(0.3 * torch.randn(t["B"].shape, generator=g).to(dtype))
    t["m"] = (torch.rand(N, generator=g) + 0.5).to(m_dtype or dtype).requires_grad_(m_trained)
    return t


def _norm(t):
    d = {n: None if t[n] is None else t[n].detach() for n in ("weight", "A", "B", "u", "v")}
    return dora.weight_norm(d["weight"].float() if d["weight"].dtype != torch.float64 else d["weight"],
                            *(None if d[n] is None else d[n].to(d["weight"].dtype) for n in ("A", "B", "u", "v")), 0.7)


def _provider(t, calls):
    def norm():
        calls.append(1)
        return _norm(t)
    return norm


def _node(t, norm):
    return functions.dora_adapter(*(t[n] for n in NAMES), t["m"], norm, 0.7, backend=cb.BACKEND)


def _python(t, norm, dropout=0.0):
    return functions.DoraFunction.apply(*(t[n] for n in NAMES), t["m"], norm, 0.7, dropout, cb.BACKEND)


def _run(op, t, norm, gy_seed=5):
    y = op(t, norm)
    grads = {}
    if y.requires_grad:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed)).to(y.dtype)
        y.backward(gy)
        grads = {n: t[n].grad for n in (*NAMES, "m") if t[n] is not None and t[n].grad is not None}
    return y, grads


def test_eager_dora_runs_the_cpp_node_and_dropout_the_python_function():
    t = _inputs(5, 7, 6, 2)
    y = _node(t, _norm(t))
    assert type(y.grad_fn).__name__ == "CppFunction"  # not DoraFunctionBackward (Python)
    y_drop = functions.dora_adapter(*(t[n] for n in NAMES), t["m"], _norm(t), 0.7, 0.1, backend=cb.BACKEND)
    assert type(y_drop.grad_fn).__name__ == "DoraFunctionBackward"


ROUTES = {"scaled": 10 ** 6, "folded": 0}  # FOLD_MIN_ROWS_PER_FEATURE that forces each route
CASES = [(path, route, bias, uv) for path in ("fused", "merged", "addmm") for route in ROUTES
         for bias, uv in [(True, True), (False, False), (True, False)]]


@pytest.mark.parametrize("trained", ["xABuv+m", "xAB", "uv+m", "m", "x"])
@pytest.mark.parametrize("path,route,bias,uv", CASES)
def test_node_equals_the_python_function_bit_for_bit(path, route, bias, uv, trained, monkeypatch):
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", ROUTES[route])
    results, calls = [], []
    for op in (_node, _python):
        t = _inputs(19, 33, 21, 4, bias=bias, uv=uv, trained=trained, m_trained="m" in trained)
        called = []
        with cb.forced_path(path):
            results.append(_run(op, t, _provider(t, called)))
        calls.append(len(called))
    (y, got), (y_ref, want) = results
    assert torch.equal(y, y_ref)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert calls[0] == calls[1] == 1


@pytest.mark.parametrize("route", ROUTES)
def test_node_takes_the_norm_from_the_merged_weight_where_the_function_does(route, monkeypatch):
    """At a GEMM-sized rank the merged forward keeps W_eff = W0 + ΔW; unfolded, both take the norm
    from its rows and never ask the provider (folded, g is needed before the GEMM: both ask)."""
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", ROUTES[route])
    results, calls = [], []
    for op in (_node, _python):
        t = _inputs(40, 24, 18, 40)
        called = []
        with cb.forced_path("merged"):
            results.append(_run(op, t, _provider(t, called)))
        calls.append(len(called))
    assert calls == ([0, 0] if route == "scaled" else [1, 1])
    (y, got), (y_ref, want) = results
    assert torch.equal(y, y_ref)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("route", ROUTES)
def test_node_in_bf16_with_an_fp32_magnitude_equals_the_python_function(route, monkeypatch):
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", ROUTES[route])
    results = []
    for op in (_node, _python):
        t = _inputs(17, 24, 20, 4, dtype=torch.bfloat16, m_dtype=torch.float32)
        results.append(_run(op, t, _provider(t, [])))
    (y, got), (y_ref, want) = results
    assert y.dtype == torch.bfloat16 and got["m"].dtype == torch.float32
    assert torch.equal(y, y_ref)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("path", ["fused", "merged", "addmm"])
def test_node_gradcheck_fp64(route, path, monkeypatch):
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", ROUTES[route])
    t = _inputs(3, 5, 4, 2, dtype=torch.float64)
    norm = _norm(t)  # a constant, as DoRA §4.3 takes it
    names = ("x", "bias", "A", "B", "u", "v", "m")
    t["bias"].requires_grad_(True)

    def f(*args):
        kw = dict(zip(names, args))
        return functions.dora_adapter(kw["x"], t["weight"], kw["bias"], kw["A"], kw["B"], kw["u"], kw["v"], kw["m"],
                                      norm, 0.7, backend=cb.BACKEND)

    with cb.forced_path(path):
        assert torch.autograd.gradcheck(f, [t[n] for n in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("M,K,N", [(0, 6, 5), (4, 0, 5), (4, 6, 0)])
def test_node_on_empty_shapes_equals_the_python_function(M, K, N, route, monkeypatch):
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", ROUTES[route])
    results = []
    for op in (_node, _python):
        t = _inputs(M, K, N, 2, lead=())
        results.append(_run(op, t, _norm(t)))
    (y, got), (y_ref, want) = results
    assert y.shape == y_ref.shape == (M, N)
    assert got.keys() == want.keys()
    for name in want:  # no input features: the norm is 0 and g = m/0, in both (NaN where it meets 0)
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_node_saves_what_the_python_function_saves():
    def numels(op):
        sizes = []
        t = _inputs(37, 23, 29, 4)

        def pack(x):
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            op(t, _norm(t))
        return sorted(sizes)

    assert numels(_node) == numels(_python)


def test_node_without_grad_builds_no_graph():
    t = _inputs(5, 7, 6, 2)
    with torch.no_grad():
        y = _node(t, _norm(t))
    assert y.grad_fn is None and not y.requires_grad


def test_second_derivatives_raise_instead_of_being_wrong():
    t = _inputs(4, 3, 2, 1, dtype=torch.float64, trained="x", m_trained=False)
    y = _node(t, _norm(t))
    (gx,) = torch.autograd.grad((y ** 2).sum(), t["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        gx.pow(2).sum().backward()


def test_node_rejects_bad_input_with_a_message():
    t = _inputs(4, 8, 6, 2)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 8\]"):
        functions.dora_adapter(t["x"][..., :6], *(t[n] for n in NAMES[1:]), t["m"], _norm(t), 0.7,
                               backend=cb.BACKEND)
    norm = _norm(t)
    with pytest.raises(ValueError, match=r"m must be \[6\]"):
        cb._C.dora_apply(*(t[n] for n in NAMES), t["m"][:5], norm, t["m"].detach() / norm, 0.7, False)
    with pytest.raises(ValueError, match="both the norm and g, or neither"):
        cb._C.dora_apply(*(t[n] for n in NAMES), t["m"], norm, None, 0.7, False)
