"""The cpp backend's eager adapter is one C++ autograd node (csrc/autograd/adapter_node.cpp).

test_cpp_ops.py checks the op against the reference on every path (it runs the node, as
every eager call does); here: that the node is what runs, that it equals the Python
autograd.Function that torch.compile traces bit for bit (same kernels, same saved tensors),
and that it refuses bad input with a message.
"""
import os

import pytest
import torch

from tests.helpers import opcheck

if os.environ.get("PEFTKERN_NO_EXT") == "1":
    pytest.skip("installed with PEFTKERN_NO_EXT=1: no C++ extension", allow_module_level=True)

from peftkern.ops import functions  # noqa: E402
from peftkern.ops.backends import cpp as cb  # noqa: E402

NAMES = ("x", "weight", "bias", "A", "B", "u", "v")


def _node(*args):
    return functions.adapter(*args, backend=cb.BACKEND)


def _python(x, weight, bias, A, B, u, v, scale, dropout=0.0):
    return functions.AdapterFunction.apply(x, weight, bias, A, B, u, v, scale, dropout, cb.BACKEND)


def test_eager_adapter_runs_the_cpp_node():
    t = opcheck.make_inputs(5, 7, 6, 2)
    y = _node(*(t[n] for n in NAMES), 0.5)
    assert type(y.grad_fn).__name__ == "CppFunction"  # not AdapterFunctionBackward (Python)
    assert type(_python(*(t[n] for n in NAMES), 0.5).grad_fn).__name__ == "AdapterFunctionBackward"


CASES = [(path, bias, u, v, dropout) for path in ("fused", "merged", "addmm")
         for bias, u, v, dropout in [(True, True, True, 0.0), (False, False, False, 0.0), (True, False, True, 0.3)]
         if not (dropout and path == "merged")]  # the merged path refuses dropout


@pytest.mark.parametrize("trained", ["xABuv", "xAB", "uv", "AB", "x"])
@pytest.mark.parametrize("path,bias,u,v,dropout", CASES)
def test_node_equals_the_python_function_bit_for_bit(path, trained, bias, u, v, dropout):
    results = []
    for op in (_node, _python):
        t = opcheck.make_inputs(19, 33, 21, 4, bias=bias, u=u, v=v, trained=trained, lead=(2,))
        with cb.forced_path(path):
            torch.manual_seed(11)
            y = op(*(t[n] for n in NAMES), 0.7, dropout)
            if y.requires_grad:
                y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        results.append([y] + [t[n].grad for n in NAMES if t[n] is not None])
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


def test_node_saves_what_the_python_function_saves():
    for trained in ("xABuv", "xA", "uv"):
        kw = dict(trained=trained)
        assert sorted(opcheck.saved_numels(_node, **kw)) == sorted(opcheck.saved_numels(_python, **kw)), trained


def test_node_gradcheck_fp64_with_leading_dims():
    t = opcheck.make_inputs(3, 5, 4, 2, dtype=torch.float64, lead=(2,))
    args = [t[n] for n in NAMES]
    for path in ("fused", "merged", "addmm"):
        with cb.forced_path(path):
            assert torch.autograd.gradcheck(lambda *a: _node(*a, 0.7), args, eps=1e-6, atol=1e-7)


def test_node_without_grad_builds_no_graph():
    t = opcheck.make_inputs(5, 7, 6, 2)
    with torch.no_grad():
        y = _node(*(t[n] for n in NAMES), 0.5)
    assert y.grad_fn is None and not y.requires_grad


def test_node_rejects_an_input_of_the_wrong_width():
    t = opcheck.make_inputs(4, 8, 6, 2)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 8\]"):
        _node(t["x"][:, :6], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.5)


@pytest.mark.parametrize("op", [_node, _python], ids=["node", "python"])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_output_may_be_modified_in_place_like_a_linear_output(op, lead):
    t = opcheck.make_inputs(5, 7, 6, 2, lead=lead)
    y = op(*(t[n] for n in NAMES), 0.5)
    y += 1.0  # a view made inside a Function would refuse this
    y.sum().backward()
    ref = opcheck.make_inputs(5, 7, 6, 2, lead=lead)
    y_ref = _python(*(ref[n] for n in NAMES), 0.5)
    (y_ref + 1.0).sum().backward()
    for n in ("x", "A", "B", "u", "v"):
        assert torch.equal(t[n].grad, ref[n].grad), n


@pytest.mark.parametrize("op", [_node, _python], ids=["node", "python"])
def test_second_derivatives_raise_instead_of_being_wrong(op):
    """The backward runs without a graph (h was saved without one), so a gradient of a gradient
    would be silently wrong: differentiating twice raises, as with @once_differentiable."""
    t = opcheck.make_inputs(4, 3, 2, 1, dtype=torch.float64, u=False, v=False, bias=False, trained="xAB")
    y = op(*(t[n] for n in NAMES), 0.5)
    (gx,) = torch.autograd.grad((y ** 2).sum(), t["x"], create_graph=True)
    plain = op(*(t[n] for n in NAMES), 0.5)
    (gx_plain,) = torch.autograd.grad((plain ** 2).sum(), t["x"])
    assert torch.equal(gx.detach(), gx_plain)  # the first derivative is still right
    with pytest.raises(RuntimeError, match="differentiate twice|second derivatives"):
        gx.pow(2).sum().backward()  # e.g. a gradient penalty


def test_gram_distances_second_derivative_raises():
    """AdaLoRA's compiled orthogonality op has the same first-order backward: its gradient carries
    no graph (an error names that), never a silently wrong second derivative."""
    P = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    Q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    (gP,) = torch.autograd.grad(cb.gram_distances([P], [Q]).sum(), P, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        gP.pow(2).sum().backward()


def test_a_float32_call_off_the_cpu_never_streams_its_backward_on_the_cpu():
    """Many rows in float32 make the cost model merge the forward; a merged backward without the forward's
    W_eff (rank ≤ 32) streams its rank-r gradients with the CPU kernel, so off the CPU (CUDA; meta here
    stands in) the backward takes the ATen GEMMs. It once ran the CPU pass on device tensors and crashed."""
    M, K, N, r = 600, 8, 8, 4
    assert cb.planned_paths(M, N, K, r, device="meta") == ("merged", "addmm")
    assert cb.planned_paths(M, N, K, r) == ("merged", "merged")  # CPU float32: the streaming pass is there
    t = {n: (None if v is None else v.detach().to("meta").requires_grad_(v.requires_grad))
         for n, v in opcheck.make_inputs(M, K, N, r).items()}
    y = _node(*(t[n] for n in NAMES), 0.5)
    y.sum().backward()
    assert t["x"].grad.shape == (M, K) and t["A"].grad.shape == (r, K)
    with cb.forced_path("merged"):  # the node keeps the path forced at its forward for its backward
        y = _node(*(t[n] for n in NAMES), 0.5)
    with pytest.raises(ValueError, match="merged backward needs"):
        y.sum().backward()
