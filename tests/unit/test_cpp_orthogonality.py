"""The compiled orthogonality distances (AdaLoRA's regulariser) against the torch reference."""
import os

import pytest
import torch

from peftkern.ops import importance, registry

if os.environ.get("PEFTKERN_NO_EXT") == "1":
    pytest.skip("installed with PEFTKERN_NO_EXT=1: no C++ extension", allow_module_level=True)

from peftkern.ops.backends import cpp as cb  # noqa: E402


def _factors(dtype, r=5, seed=0):
    """P-like [N, r] (odd N, one of them close to orthonormal, where G − I is mostly
    cancellation) and Q-like [r, K] matrices. (Exactly orthonormal has its own test: there
    the gradient's direction is rounding noise.)"""
    g = torch.Generator().manual_seed(seed)
    columns = [torch.randn(n, r, generator=g, dtype=dtype) * 0.3 for n in (7, 19, 1)]
    orthonormal = torch.linalg.qr(torch.randn(11, r, generator=g, dtype=torch.float64))[0]
    columns.append((orthonormal + 1e-3 * torch.randn(11, r, generator=g, dtype=torch.float64)).to(dtype))
    rows = [torch.randn(r, k, generator=g, dtype=dtype) * 0.3 for k in (9, 33)]
    return [t.requires_grad_(True) for t in columns], [t.requires_grad_(True) for t in rows]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_distances_and_gradients_match_reference(dtype, tol):
    """Against the reference in float64 on the same values (near orthonormality G − I is
    mostly cancellation, so float32 is checked against the exact values, not its own rounding)."""
    columns, rows = _factors(dtype)
    mats = columns + rows
    exact = [t.detach().double().requires_grad_(True) for t in mats]
    weights = torch.linspace(0.5, 2.0, len(mats), dtype=torch.float64)  # distinct upstream gradients
    got = cb.gram_distances(columns, rows)
    want = importance.gram_distances_reference(exact[:len(columns)], exact[len(columns):])
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    got_grads = torch.autograd.grad((got * weights.to(dtype)).sum(), mats)
    want_grads = torch.autograd.grad((want * weights).sum(), exact)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"matrix {i}: {m}")


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    P = (torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    Q = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, q: cb.gram_distances([p], [q]), (P, Q))


def test_exactly_orthogonal_has_zero_gradient_not_nan():
    P = torch.eye(6, 3, dtype=torch.float64, requires_grad=True)  # PᵀP = I exactly
    Q = torch.eye(3, 8, dtype=torch.float64, requires_grad=True)
    d = cb.gram_distances([P], [Q])
    assert torch.equal(d, torch.zeros(2, dtype=torch.float64))
    gp, gq = torch.autograd.grad(d.sum(), (P, Q))
    assert torch.equal(gp, torch.zeros_like(P)) and torch.equal(gq, torch.zeros_like(Q))


def test_the_registry_names_the_backend_that_ran():
    columns, rows = _factors(torch.float32)
    cpp, torch_backend = registry.load("cpp"), registry.load("torch")
    d_cpp, path = importance.gram_distances(cpp, columns, rows)
    assert path == "cpp"
    d_torch, path = importance.gram_distances(torch_backend, columns, rows)
    assert path == "torch"
    torch.testing.assert_close(d_cpp, d_torch)
    # bf16 is not the extension's: the torch backend's op runs, and says so
    _, path = importance.gram_distances(cpp, [c.bfloat16() for c in columns], [r.bfloat16() for r in rows])
    assert path == "torch"


def test_bad_input_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="2-D"):
        cb.gram_distances([torch.randn(3)], [])
    with pytest.raises(TypeError, match="float32 or float64"):
        cb.gram_distances([torch.randn(4, 2).bfloat16()], [])
