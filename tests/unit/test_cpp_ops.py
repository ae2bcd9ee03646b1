"""The C++ backend's ops (peftkern._C through cpp_backend) against the plain-torch reference.

Every adapter check runs on each code path the cost model can pick (fused, merged,
addmm) by forcing it, plus "auto"; bf16 runs the paths that bf16 may use.
"""
import os

import pytest
import torch

from tests.helpers import opcheck

if os.environ.get("PEFTKERN_NO_EXT") == "1":  # a deliberate build without the extension; otherwise it must import
    pytest.skip("installed with PEFTKERN_NO_EXT=1: no C++ extension", allow_module_level=True)

from peftkern.ops.backends import cpp as cb  # noqa: E402
from peftkern.ops.functions import BoundOps  # noqa: E402

ops = BoundOps(cb.BACKEND)

FLOAT_PATHS = ["auto", "fused", "merged", "addmm"]


@pytest.mark.parametrize("path", FLOAT_PATHS)
@pytest.mark.parametrize("M,K,N,r", opcheck.ODD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adapter_matches_reference(M, K, N, r, dtype, path):
    with cb.forced_path(path):
        opcheck.compare_adapter(ops.adapter, M, K, N, r, dtype=dtype)


@pytest.mark.parametrize("path", ["fused", "merged", "addmm"])
@pytest.mark.parametrize("trained", ["xABuv", "xAB", "AB", "xB", "xA", "uv", "xuv", "Bu", "Auv", "x"])
@pytest.mark.parametrize("bias,u,v", [(True, True, True), (False, False, False), (True, False, True)])
def test_adapter_gradients_only_for_trained(trained, bias, u, v, path):
    with cb.forced_path(path):
        opcheck.compare_adapter(ops.adapter, 37, 123, 45, 4, bias=bias, u=u, v=v, trained=trained)


@pytest.mark.parametrize("path", ["fused", "addmm"])
def test_adapter_large_odd_rank(path):
    """r = 37: the kernels' rank tiles (4 wide) leave a remainder, and auto would pick addmm."""
    with cb.forced_path(path):
        opcheck.compare_adapter(ops.adapter, 45, 70, 66, 37)


@pytest.mark.parametrize("path", FLOAT_PATHS)
def test_adapter_batched_leading_dims(path):
    with cb.forced_path(path):
        opcheck.compare_adapter(ops.adapter, 7, 33, 20, 4, lead=(3,))


@pytest.mark.parametrize("path", ["auto", "addmm"])
@pytest.mark.parametrize("M,K,N,r", [(37, 64, 48, 8), (1, 123, 45, 4)])
def test_adapter_bf16_matches_fp64_reference(M, K, N, r, path):
    with cb.forced_path(path):
        opcheck.compare_adapter(ops.adapter, M, K, N, r, dtype=torch.bfloat16)


@pytest.mark.parametrize("path", ["fused", "merged"])
def test_bf16_refuses_fp32_only_paths(path):
    """Merging would round ΔW away in bf16 and the fused kernels are fp32/fp64: forcing
    either raises instead of silently running something else."""
    inp = opcheck.make_inputs(5, 8, 6, 2, dtype=torch.bfloat16)
    with cb.forced_path(path), pytest.raises(ValueError, match=path):
        ops.adapter(inp["x"], inp["weight"], inp["bias"], inp["A"], inp["B"], inp["u"], inp["v"], 0.5)


@pytest.mark.parametrize("path", ["fused", "merged", "addmm"])
@pytest.mark.parametrize("bias,u,v", [(True, True, True), (False, False, False), (True, True, False)])
def test_adapter_gradcheck_fp64(bias, u, v, path):
    with cb.forced_path(path):
        assert opcheck.gradcheck_adapter(ops.adapter, bias=bias, u=u, v=v)


@pytest.mark.parametrize("path", ["fused", "merged", "addmm"])
def test_weight_and_bias_gradients_when_unfrozen(path):
    inp = opcheck.make_inputs(9, 7, 5, 2, dtype=torch.float64)
    inp["weight"].requires_grad_(True)
    inp["bias"].requires_grad_(True)
    args = [inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    with cb.forced_path(path):
        assert torch.autograd.gradcheck(lambda *a: ops.adapter(*a, 0.7), args)


@pytest.mark.parametrize("path", ["fused", "merged"])
def test_non_contiguous_inputs(path):
    """Conv1D weights arrive as a transposed view, tied A as a column slice, x as a view."""
    g = torch.Generator().manual_seed(11)
    M, K, N, r = 13, 21, 17, 3
    x = torch.randn(K, M, generator=g, dtype=torch.float64).t().requires_grad_(True)
    weight = torch.randn(K, N, generator=g, dtype=torch.float64).t()
    A_full = torch.randn(r, K + 5, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(N, r, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(r, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    from peftkern.ops import reference

    with cb.forced_path(path):
        y = ops.adapter(x, weight, None, A_full[:, :K], B, u, v, 0.3)
    y_ref = reference.adapter(x, weight, None, A_full[:, :K], B, u, v, 0.3)
    torch.testing.assert_close(y, y_ref)
    leaves = (x, A_full, B, u, v)
    grads = torch.autograd.grad(y.sum(), leaves)
    grads_ref = torch.autograd.grad(y_ref.sum(), leaves)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def _activation_sizes(path, M, K, N, r):
    with cb.forced_path(path):
        sizes = opcheck.saved_numels(ops.adapter, M, K, N, r)
    return sorted(s for s in sizes if s not in (N * K, r * K, N * r, r, N)), sizes


def test_saved_tensors_fused_keeps_x_and_ax_only():
    M, K, N, r = 37, 23, 29, 4
    activations, sizes = _activation_sizes("fused", M, K, N, r)
    assert activations == sorted([M * K, M * r]), sizes
    assert M * N not in sizes


def test_saved_tensors_merged_keeps_x_only():
    """The merged forward never computes h; backward recomputes it inside its pass."""
    M, K, N, r = 37, 23, 29, 4
    activations, sizes = _activation_sizes("merged", M, K, N, r)
    assert activations == [M * K], sizes


# GEMM-sized ranks (r > 32): a merged forward keeps W_eff and the backward takes every factor
# gradient from G = dyᵀ·h (csrc/cpu/adapter.cpp, backward_with_merged_weight).
GEMM_RANK = 40


@pytest.mark.parametrize("trained", ["xABuv", "uv", "xuv", "x", "xA", "Bu", "Auv"])
@pytest.mark.parametrize("u,v", [(True, True), (False, False), (True, False), (False, True)])
def test_merged_gemm_rank_gradients(trained, u, v):
    with cb.forced_path("merged"):
        opcheck.compare_adapter(ops.adapter, 37, 51, 45, GEMM_RANK, u=u, v=v, trained=trained)
        opcheck.compare_adapter(ops.adapter, 37, 51, 45, GEMM_RANK, u=u, v=v, trained=trained, dtype=torch.float64)


def test_merged_gemm_rank_gradcheck_fp64():
    inp = opcheck.make_inputs(6, 35, 34, 33, dtype=torch.float64)
    inp["weight"].requires_grad_(True)
    args = [inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    with cb.forced_path("merged"):
        assert torch.autograd.gradcheck(lambda *a: ops.adapter(*a, 0.7), args)


def test_saved_tensors_merged_gemm_rank_keep_w_eff_not_h():
    """At a GEMM-sized rank the merged forward saves W_eff [N, K] (rebuilding it would cost
    N·K·r multiply-adds again) and no [M, r] activation."""
    M, K, N, r = 41, 37, 35, GEMM_RANK
    with cb.forced_path("merged"):
        sizes = opcheck.saved_numels(ops.adapter, M, K, N, r)
    assert sizes.count(N * K) == 2, sizes  # the base weight and W_eff
    assert M * r not in sizes and M * N not in sizes


def test_backward_is_deterministic():
    """Row reductions use per-thread partials summed in a fixed order."""
    inp = opcheck.make_inputs(301, 96, 80, 8)
    grads = []
    for _ in range(2):
        leaves = [inp[n] for n in ("x", "A", "B", "u", "v")]
        y = ops.adapter(inp["x"], inp["weight"], inp["bias"], inp["A"], inp["B"], inp["u"], inp["v"], 0.5)
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("u,v", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_joint_shrink_expand_matches_reference(u, v, dtype):
    opcheck.compare_joint(ops.shrink, ops.expand, 37, 33, [33, 17, 17], 4, u=u, v=v, dtype=dtype)


def test_joint_bf16_matches_reference():
    opcheck.compare_joint(ops.shrink, ops.expand, 37, 64, [64, 32, 32], 8, dtype=torch.bfloat16)


def test_joint_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)

    def rnd(*s, grad=True):
        return torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, A, u, B, v = rnd(3, 5), rnd(2, 5), rnd(2), rnd(4, 2), rnd(4)
    W, b = rnd(4, 5), rnd(4)  # the base weights too, as when a user unfreezes them
    assert torch.autograd.gradcheck(lambda x, A, u, W, b, B, v: ops.expand(x, W, b, ops.shrink(x, A, u), B, v, 0.3),
                                    (x, A, u, W, b, B, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("L,h_in,h2,P", [(7, 12, 9, 20), (1, 5, 3, 4), (30, 64, 32, 200)])
def test_hypernet_matches_reference(L, h_in, h2, P, dtype):
    opcheck.compare_hypernet(ops.hypernet, L, h_in, h2, P, dtype=dtype)


def test_hypernet_gradcheck_fp64():
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (5, 4), (5,), (6, 5), (6,))]
    assert torch.autograd.gradcheck(ops.hypernet, ts)


def test_hypernet_without_biases_and_frozen_parts():
    from peftkern.ops import reference

    g = torch.Generator().manual_seed(6)
    E = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    W1 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    W2 = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out = ops.hypernet(E, W1, None, W2, None)
    ref = reference.hypernet(E, W1, None, W2, None)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.sum(), (E, W2))
    want = torch.autograd.grad(ref.sum(), (E, W2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_dtype_mismatch_is_a_type_error():
    inp = opcheck.make_inputs(5, 8, 6, 2)
    with pytest.raises(TypeError, match="dtype"):
        ops.adapter(inp["x"], inp["weight"], inp["bias"], inp["A"].double(), inp["B"], inp["u"], inp["v"], 0.5)


def test_shape_mismatch_is_a_value_error():
    inp = opcheck.make_inputs(5, 8, 6, 2)
    with pytest.raises(ValueError, match="B must have shape"):
        ops.adapter(inp["x"], inp["weight"], inp["bias"], inp["A"], inp["B"][:, :1], inp["u"], inp["v"], 0.5)


def test_unknown_forced_path_is_a_value_error():
    with pytest.raises(ValueError, match="valid choices"):
        with cb.forced_path("fastest"):
            pass
