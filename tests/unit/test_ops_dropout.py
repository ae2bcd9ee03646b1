"""Dropout on the adapter's input (PEFT's lora_dropout), fused into every backend's kernels.

Each backend draws its mask from the call's seed and regenerates it in the backward, so
the check is: the op's output and every gradient equal the reference computed with the
mask the backend says it drew (``Backend.dropout_mask``), and no M×K tensor (mask or
dropped copy of x) is saved for the backward.
"""
import pytest
import torch

from peftkern.ops import reference
from peftkern.ops.functions import BoundOps, new_seed
from tests.helpers import opcheck

_backend = opcheck.available_backend

BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(_backend(n) is None, reason=f"{n} unavailable"))
            for n in ("torch", "cpp", "triton")]
CPP_PATHS = ["fused", "addmm"]  # merged folds ΔW into W0 and cannot see a dropped input


def _paths(name):
    if name != "cpp":
        return [None]
    return CPP_PATHS


def _run(name, fn):
    if name == "cpp":
        from peftkern.ops.backends import cpp as cpp_kernels

        for path in CPP_PATHS:
            with cpp_kernels.forced_path(path):
                fn()
    else:
        fn()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trained", ["xABuv", "xAB", "AB", "x", "Bu"])
def test_adapter_with_dropout_matches_reference(backend, trained):
    b = _backend(backend)
    ops = BoundOps(b)
    _run(backend, lambda: opcheck.compare_adapter(ops.adapter, 37, 45, 29, 4, trained=trained, dropout=0.3,
                                                  mask=b.dropout_mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_with_dropout_fp64_and_leading_dims(backend):
    b = _backend(backend)
    ops = BoundOps(b)
    _run(backend, lambda: opcheck.compare_adapter(ops.adapter, 7, 33, 20, 4, lead=(3,), dtype=torch.float64,
                                                  dropout=0.5, mask=b.dropout_mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_gradcheck_fp64(backend):
    """The mask is a function of the seed: with the seed fixed, the op is a smooth function."""
    ops = BoundOps(_backend(backend))
    inp = opcheck.make_inputs(5, 7, 4, 2, dtype=torch.float64)

    def fixed_seed(*a):
        torch.manual_seed(3)
        return ops.adapter(*a, 0.7, 0.4)

    args = [inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    _run(backend, lambda: torch.autograd.gradcheck(fixed_seed, args, eps=1e-6, atol=1e-7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keeps_about_one_minus_p_and_differs_per_call(backend):
    b = _backend(backend)
    like = torch.empty(0)
    keep = b.dropout_mask(new_seed(0.25), 200, 300, 0.25, like)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(keep.mean()) - 0.75) < 0.01
    assert not torch.equal(keep, b.dropout_mask(new_seed(0.25), 200, 300, 0.25, like))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_saves_no_mask_and_no_dropped_copy(backend):
    """Saved for backward with dropout: x and h, exactly as without (plus the one-element seed)."""
    ops = BoundOps(_backend(backend))
    M, K, N, r = 37, 23, 29, 4
    sizes = opcheck.saved_numels(lambda *a: ops.adapter(*a, 0.3), M, K, N, r)
    activations = sorted(s for s in sizes if s not in (N * K, r * K, N * r, r, N, 1))
    assert activations == sorted([M * K, M * r]), sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_joint_shrink_with_dropout(backend):
    """The joint form's dropout is in the shared shrink: each expand sees the same dropped input."""
    b = _backend(backend)
    ops = BoundOps(b)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 17, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 17, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def check():
        torch.manual_seed(opcheck.DROPOUT_SEED)
        hu = ops.shrink(x, A, u, 0.3)
        keep = opcheck.dropout_keep(b.dropout_mask, 0.3, 13, 17, x)
        ref = reference.shrink(reference.dropped(x, keep, 0.3), A, u)
        torch.testing.assert_close(hu, ref)
        gy = torch.randn(hu.shape, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(hu, (x, A, u), gy)
        want = torch.autograd.grad(ref, (x, A, u), gy)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w)

    _run(backend, check)


def test_bad_dropout_is_rejected_with_the_valid_range():
    from peftkern.ops.functions import check_dropout

    for bad in (-0.1, 1.0, 1.5, "0.1", True):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            check_dropout(bad)
