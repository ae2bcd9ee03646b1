"""Empty shapes: no tokens (M = 0), no input features (K = 0), no output features (N = 0), rank 0.

nn.Linear returns the bias for K = 0 and an empty tensor for M = 0 or N = 0; the adapter op
must do the same on every backend (with x: [2, M, K], so the leading dimensions are kept), and
every gradient must be the reference's: zeros or empty, never a reshape error. ``patch`` never
builds such a layer (rank ≤ min(K, N)); these reach the op through ``peftkern.ops``.
"""
import pytest
import torch

from peftkern.ops.functions import BoundOps
from tests.helpers import opcheck

EMPTY = [(0, 5, 3, 2), (4, 0, 3, 2), (4, 5, 0, 2), (4, 5, 3, 0), (0, 0, 0, 0)]
BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(opcheck.available_backend(n) is None, reason=f"{n} unavailable"))
            for n in ("torch", "cpp", "triton")]


def _paths(name):
    if name != "cpp":
        return [None]
    from peftkern.ops.backends import cpp as cpp_kernels

    return [cpp_kernels.forced_path(p) for p in ("fused", "addmm")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,r", EMPTY)
@pytest.mark.parametrize("trained", ["xABuv", "AB"])
def test_adapter_on_empty_shapes_matches_reference(backend, M, K, N, r, trained):
    ops = BoundOps(opcheck.available_backend(backend))
    for path in _paths(backend):
        if path is None:
            opcheck.compare_adapter(ops.adapter, M, K, N, r, trained=trained, lead=(2,))
        else:
            with path:
                opcheck.compare_adapter(ops.adapter, M, K, N, r, trained=trained, lead=(2,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_input_features_returns_the_bias_like_nn_linear(backend):
    ops = BoundOps(opcheck.available_backend(backend))
    linear = torch.nn.Linear(0, 3)
    x = torch.randn(2, 4, 0)
    y = ops.adapter(x, linear.weight.detach(), linear.bias.detach(), torch.zeros(1, 0), torch.randn(3, 1), None, None,
                    0.5)
    torch.testing.assert_close(y, linear(x).detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,r", [(0, 5, 2), (4, 0, 2), (4, 5, 0)])
def test_joint_shrink_expand_on_empty_shapes(backend, M, K, r):
    ops = BoundOps(opcheck.available_backend(backend))
    opcheck.compare_joint(ops.shrink, ops.expand, M, K, [3, 0, 2], r)
