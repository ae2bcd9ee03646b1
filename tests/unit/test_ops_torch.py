"""The torch backend's hand-written autograd Functions against the plain-torch reference."""
import pytest
import torch

from peftkern.ops.backends import torch as tb
from peftkern.ops.functions import BoundOps
from tests.helpers import opcheck

ops = BoundOps(tb.BACKEND)


@pytest.mark.parametrize("M,K,N,r", opcheck.ODD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adapter_matches_reference(M, K, N, r, dtype):
    opcheck.compare_adapter(ops.adapter, M, K, N, r, dtype=dtype)


@pytest.mark.parametrize("trained", ["xABuv", "xAB", "AB", "xB", "xA", "uv", "xuv", "Bu", "Auv", "x"])
@pytest.mark.parametrize("bias,u,v", [(True, True, True), (False, False, False), (True, False, True)])
def test_adapter_gradients_only_for_trained(trained, bias, u, v):
    opcheck.compare_adapter(ops.adapter, 37, 123, 45, 4, bias=bias, u=u, v=v, trained=trained)


def test_adapter_batched_leading_dims():
    opcheck.compare_adapter(ops.adapter, 7, 33, 20, 4, lead=(3,))


def test_adapter_bf16_matches_fp64_reference():
    opcheck.compare_adapter(ops.adapter, 37, 64, 48, 8, dtype=torch.bfloat16)


@pytest.mark.parametrize("bias,u,v", [(True, True, True), (False, False, False), (True, True, False)])
def test_adapter_gradcheck_fp64(bias, u, v):
    assert opcheck.gradcheck_adapter(ops.adapter, bias=bias, u=u, v=v)


def test_adapter_saves_only_x_and_ax():
    """Backward keeps x and h = x·Aᵀ (plus the parameters), never an M×N intermediate."""
    M, K, N, r = 37, 23, 29, 4
    sizes = opcheck.saved_numels(ops.adapter, M, K, N, r)
    activations = sorted(s for s in sizes if s not in (N * K, r * K, N * r, r, N))
    assert activations == sorted([M * K, M * r]), sizes
    assert M * N not in sizes


@pytest.mark.parametrize("u,v", [(True, True), (False, False)])
def test_joint_shrink_expand_matches_reference(u, v):
    opcheck.compare_joint(ops.shrink, ops.expand, 37, 33, [33, 17, 17], 4, u=u, v=v)


def test_joint_gradcheck_fp64():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, u, B, v: ops.expand(x, W, b, ops.shrink(x, A, u), B, v, 0.3),
                                    (x, A, u, B, v))


def test_weight_and_bias_gradients_when_unfrozen():
    """If a user unfreezes the base layer, its gradients are still right."""
    inp = opcheck.make_inputs(9, 7, 5, 2, dtype=torch.float64)
    inp["weight"].requires_grad_(True)
    inp["bias"].requires_grad_(True)
    args = [inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    assert torch.autograd.gradcheck(lambda *a: ops.adapter(*a, 0.7), args)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("trained", ["xABuv", "xA", "uv"])
def test_the_low_rank_term_alone_equals_the_adapter_over_a_zero_weight(trained, dropout):
    """weight=None (a 4-bit base's own op computes W0·x): y and every gradient are the adapter's over a
    zero W0, bit for bit, dropout's mask included; dx is the low-rank term's alone, not added to zeros."""
    results = []
    for weight in ("none", "zeros"):
        t = opcheck.make_inputs(19, 33, 21, 4, trained=trained)
        W = None if weight == "none" else torch.zeros_like(t["weight"])
        torch.manual_seed(5)  # the dropout seed
        y = ops.adapter(t["x"], W, t["bias"], t["A"], t["B"], t["u"], t["v"], 0.7, dropout)
        y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        results.append([y] + [t[n].grad for n in ("x", "A", "B", "u", "v")])
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fp16_keeps_s_out_of_h_as_peft_does(dropout):
    """s = 4, h = x·Aᵀ ≈ 20,000 (in fp16's range, s·h is not): PEFT computes s·(B·h) and stays finite; so
    does this backend, which once kept s·h in fp16 (NaN at B = 0, LoRA's initialisation; inf after)."""
    K, N, r, s = 32, 16, 2, 4.0
    x = torch.full((3, K), 3600.0, dtype=torch.float16)
    A = torch.full((r, K), K ** -0.5, dtype=torch.float16)  # h = 3600·√32 ≈ 20,365; s·h ≈ 81,000 > 65,504
    W = torch.zeros(N, K, dtype=torch.float16)
    for B in (torch.zeros(N, r, dtype=torch.float16), torch.full((N, r), 1e-3, dtype=torch.float16)):
        xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
        torch.manual_seed(0)
        y = ops.adapter(xs, W, None, As, Bs, None, None, s, dropout)
        assert torch.isfinite(y).all()
        want = s * ((x.float() @ A.float().t()) @ B.float().t())  # = s·B·h in fp32, PEFT's order
        if not dropout:
            torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=1e-3)
        y.backward(torch.full_like(y, 1e-2))  # a gradient whose dB = s·dyᵀ·h fits fp16 (a GradScaler's job)
        assert all(torch.isfinite(t.grad).all() for t in (xs, As, Bs))
