"""DoRA's op on every backend against the plain-torch reference (PEFT's formula): the forward and every
gradient (x, A, B, u, v, m through g, bias), odd and empty shapes, fp64 gradcheck, dropout with the
same mask, bf16; and the weight norm's expansion against the dense norm, within its stated bound,
rows where ΔW cancels W0 included."""
import pytest
import torch

from peftkern import dora
from peftkern.ops import functions, reference
from peftkern.ops.functions import BoundOps
from tests.helpers import opcheck

BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(opcheck.available_backend(n) is None, reason=f"{n} unavailable"))
            for n in ("torch", "cpp", "triton")]
SHAPES = [(7, 9, 5, 3), (1, 33, 17, 4), (37, 64, 48, 8), (5, 2, 70, 1)]
ROUTES = ["scaled", "folded"]  # DoRA's two routes (functions.dora_folds), each forced on every shape


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    """Force the folded route (g in W0 and v) or the scaled one (a column scale each way)."""
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", 0 if request.param == "folded" else float("inf"))
    return request.param


def _inputs(M, K, N, r, dtype=torch.float32, bias=True, uv=True, lead=(), seed=0):
    t = opcheck.make_inputs(M, K, N, r, dtype=dtype, bias=bias, u=uv, v=uv, lead=lead, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained adapter: B ≠ 0
        t["B"].copy_(0.3 * torch.randn(t["B"].shape, generator=g).to(dtype))
    m = (torch.rand(N, generator=g) + 0.5).to(dtype).requires_grad_(True)
    return t, m


def _ours(ops, t, m, dropout=0.0):
    norm = dora.weight_norm(t["weight"].detach(), t["A"].detach(), t["B"].detach(),
                            None if t["u"] is None else t["u"].detach(), None if t["v"] is None else t["v"].detach(),
                            0.5)
    return ops.dora_adapter(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], m, norm, 0.5, dropout)


def _grads(y, tensors, seed=3):
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(dy)
    out = {n: t.grad.clone() for n, t in tensors.items() if t is not None and t.grad is not None}
    for t in tensors.values():
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("bias,uv", [(True, True), (False, False)])
def test_forward_and_every_gradient_match_the_reference(backend, M, K, N, r, bias, uv, route):
    ops = BoundOps(opcheck.available_backend(backend))
    assert_matches_reference(ops, *_inputs(M, K, N, r, bias=bias, uv=uv, lead=(2,) if M == 7 else ()))


def assert_matches_reference(ops, t, m):
    """DoRA on ``ops`` against the reference: the output and every gradient (x, A, B, m at least)."""
    tensors = {**t, "m": m}
    y = _ours(ops, t, m)
    got = _grads(y, tensors)
    want_y = reference.dora_adapter(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.5, m)
    want = _grads(want_y, tensors)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and {"x", "A", "B", "m"} <= got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_peft_formula_with_the_same_mask(backend):
    ops = BoundOps(opcheck.available_backend(backend))
    t, m = _inputs(19, 33, 17, 4, lead=(2,))
    tensors = {**t, "m": m}
    torch.manual_seed(11)
    y = _ours(ops, t, m, dropout=0.3)
    got = _grads(y, tensors)
    torch.manual_seed(11)  # the mask is drawn from torch's generator, as nn.Dropout's
    keep = (torch.rand(t["x"].reshape(-1, 33).shape) >= 0.3).to(t["x"].dtype).reshape(t["x"].shape)
    want_y = reference.dora_adapter(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.5, m, keep, 0.3)
    want = _grads(want_y, tensors)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_gradcheck_fp64(backend, dropout, route):
    ops = BoundOps(opcheck.available_backend(backend))
    t, _ = _inputs(5, 7, 6, 2, dtype=torch.float64)
    names = ["x", "A", "B", "u", "v", "bias"]

    def f(x, A, B, u, v, bias, m):
        torch.manual_seed(5)  # the same dropout mask in every evaluation
        return ops.dora_adapter(x, t["weight"], bias, A, B, u, v, m, norm, 0.5, dropout)

    m = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_(True)
    norm = torch.rand(6, dtype=torch.float64) + 0.5  # a constant (DoRA §4.3): m's gradient is through g = m / norm
    assert torch.autograd.gradcheck(f, [t[n] for n in names] + [m])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend, route):
    ops = BoundOps(opcheck.available_backend(backend))
    for M, K, N in ((0, 9, 5), (4, 9, 0)):
        t, m = _inputs(M, K, N, 2) if N else (opcheck.make_inputs(M, K, N, 2), torch.ones(0, requires_grad=True))
        y = _ours(ops, t, m)
        assert y.shape == (M, N)
        y.sum().backward()
        assert t["A"].grad.shape == t["A"].shape


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bf16_agrees_with_fp32(backend, route):
    ops = BoundOps(opcheck.available_backend(backend))
    t, m = _inputs(37, 64, 48, 8)
    y32 = _ours(ops, t, m)
    tb = {k: (None if v is None else v.detach().bfloat16().requires_grad_(v.requires_grad)) for k, v in t.items()}
    mb = m.detach().bfloat16().requires_grad_(True)
    yb = _ours(ops, tb, mb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y32.detach(), rtol=3e-2, atol=3e-2)
    yb.float().sum().backward()
    assert mb.grad.dtype == torch.bfloat16 and torch.isfinite(mb.grad.float()).all()


def test_the_output_may_not_be_modified_in_place_and_says_so(route):
    """DoRA's backward reads its output (the one pass over dy needs z = (y − b)/g): an in-place change
    of the output is caught by torch's version check, not silently wrong."""
    ops = BoundOps(opcheck.available_backend("torch"))
    t, m = _inputs(5, 7, 6, 2)
    y = _ours(ops, t, m)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("route,path,provider_calls", [("scaled", "merged", 0), ("scaled", "fused", 1),
                                                       ("folded", "merged", 1), ("folded", "fused", 1)])
def test_the_cpp_merged_path_takes_the_norm_from_its_merged_weight(route, path, provider_calls, monkeypatch):
    """At ranks above 32 the C++ merged path forms W_eff = W0 + ΔW anyway: its row norms are DoRA's norm,
    so the expansion's [N, K]·[K, r] product is skipped (the provider is not called) and the result
    is the reference's; on another path the provider gives the norm. The folded route needs g before
    the GEMM (its merged weight is g⊙W_eff), so it always asks the provider."""
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", 0 if route == "folded" else float("inf"))
    if opcheck.available_backend("cpp") is None:
        pytest.skip("cpp unavailable")
    from peftkern.ops.backends import cpp

    ops = BoundOps(opcheck.available_backend("cpp"))
    t, m = _inputs(70, 24, 20, 40, bias=True, uv=True)
    calls = []

    def provider():
        calls.append(1)
        return dora.weight_norm(t["weight"].detach(), t["A"].detach(), t["B"].detach(), t["u"].detach(),
                                t["v"].detach(), 0.5)

    tensors = {**t, "m": m}
    with cpp.forced_path(path):
        y = ops.dora_adapter(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], m, provider, 0.5)
        got = _grads(y, tensors)
    assert len(calls) == provider_calls
    want_y = reference.dora_adapter(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.5, m)
    want = _grads(want_y, tensors)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert {"x", "A", "B", "u", "v", "m"} <= got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_route_rule_folds_only_many_tokens_without_dropout():
    assert functions.dora_folds(1152, 576, 0.0) and not functions.dora_folds(1151, 576, 0.0)
    assert not functions.dora_folds(10 ** 6, 576, 0.1)  # PEFT's dropout formula needs W0 on the undropped x


def _spy(be, seen):
    """``be`` with no DoRA node (DoraFunction runs) whose column-scale kernels report (name, args) to ``seen``."""
    class Spy:
        def __getattr__(self, name):
            if name == "dora_node":
                return None
            value = getattr(be, name)
            if name.startswith("dora_scale"):
                return lambda *a: seen(name, a) or value(*a)
            return value
    return Spy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_folded_route_makes_no_output_sized_pass_of_its_own(backend, monkeypatch):
    """Folded, the forward calls no column scale and the backward asks the scale pass for dg alone
    (need_dz false): no [M, N] tensor is written beyond the adapter's own output and dx. (DoraFunction's
    dataflow; the cpp backend's C++ node repeats it, bit for bit: test_cpp_dora_node.py.)"""
    calls = []
    spy = _spy(opcheck.available_backend(backend), lambda name, a: calls.append((name, a[-1])))
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", 0)
    t, m = _inputs(37, 64, 48, 8)
    y = BoundOps(spy).dora_adapter(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], m,
                                     lambda: dora.weight_norm(t["weight"].detach(), t["A"].detach(), t["B"].detach(),
                                                              t["u"].detach(), t["v"].detach(), 0.5), 0.5)
    y.sum().backward()
    assert calls == [("dora_scale_backward", False)]
    assert m.grad is not None and t["x"].grad is not None



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_the_dm_pass_reads_a_wider_g_and_writes_it_in_that_dtype(backend, bias):
    """DoRA's folded route hands its bf16 pass the fp32 m itself (no cast of m either way): the sums
    accumulate in fp32 and are divided by the fp32 m, dg in fp32, as from fp32 dy and y to the
    rounding of bf16's products; with dz asked for, g must have dy's dtype."""
    be = opcheck.available_backend(backend)
    gen = torch.Generator().manual_seed(5)
    dy, y = (torch.randn(37, 48, generator=gen).bfloat16() for _ in range(2))
    m = torch.rand(48, generator=gen) + 0.5
    b = torch.randn(48, generator=gen).bfloat16() if bias else None
    def within_bf16_products(got, terms, divisor=1.0):  # each product rounded once at most (2⁻⁹), summed in fp32
        assert got.dtype == torch.float32
        want, bound = terms.sum(0) / divisor, 2 ** -8 * terms.abs().sum(0) / divisor + 1e-6
        assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()

    dz, dm = be.dora_scale_backward(dy, y, m, b, True, True, False)
    assert dz is None
    within_bf16_products(dm, dy.double() * (y.double() - (0 if b is None else b.double())), m.double())
    _, dg = be.dora_scale_backward(dy, y, m, b, False, True, False)  # z given: no division
    within_bf16_products(dg, dy.double() * y.double())
    with pytest.raises(TypeError, match="dtype"):
        be.dora_scale_backward(dy, y, m, b, True, True, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_folded_route_casts_no_fp32_magnitude(backend, monkeypatch):
    """On a bf16 model with fp32 adapter weights (autocast_adapter_dtype), the folded route's dm pass
    takes m itself, and dm comes back in fp32 from it: no launch casts m forward or dm backward."""
    seen = []
    spy = _spy(opcheck.available_backend(backend), lambda name, a: seen.append(a[2]) if "backward" in name else None)
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", 0)
    t, m = _inputs(37, 64, 48, 8)
    tb = {k: (None if v is None else v.detach().bfloat16().requires_grad_(v.requires_grad)) for k, v in t.items()}
    norm = dora.weight_norm(tb["weight"].float(), tb["A"].float(), tb["B"].float(), tb["u"].float(), tb["v"].float(),
                            0.5)
    y = BoundOps(spy).dora_adapter(tb["x"], tb["weight"], tb["bias"], tb["A"], tb["B"], tb["u"], tb["v"], m, norm, 0.5)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    y.backward(dy)
    assert len(seen) == 1 and seen[0].dtype == torch.float32 and seen[0].data_ptr() == m.data_ptr()
    assert m.grad.dtype == torch.float32
    terms = dy.double() * (y.detach().double() - tb["bias"].double())
    bound = 2 ** -8 * terms.abs().sum(0) / m.detach().double() + 1e-6
    assert ((m.grad.double() - terms.sum(0) / m.detach().double()).abs() <= bound).all()

# --- the norm -------------------------------------------------------------------------------------------------


def _factors(N, K, r, dtype, seed=0, cancel_rows=()):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / K ** 0.5
    B = torch.randn(N, r, generator=g, dtype=torch.float64)
    u, v = torch.rand(r, generator=g, dtype=torch.float64) + 0.5, torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    s = 0.5
    for n in cancel_rows:  # ΔW_n ≈ −W0_n: W0's row made (almost) the negative of the adapter's
        delta = s * (v[n] * (B[n] * u)) @ A
        W[n] = -delta * (1 + 1e-4)
    return [t.to(dtype) for t in (W, A, B, u, v)], s


def test_the_expansion_equals_the_dense_norm_in_fp64():
    (W, A, B, u, v), s = _factors(40, 64, 8, torch.float64)
    got = dora.weight_norm(W, A, B, u, v, s)
    torch.testing.assert_close(got, reference.dora_norm(W, A, B, u, v, s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_error_stays_within_the_stated_bound_where_the_adapter_cancels_the_base(dtype):
    (W, A, B, u, v), s = _factors(40, 576, 8, dtype, cancel_rows=(0, 7, 19))
    exact = reference.dora_norm(W.double(), A.double(), B.double(), u.double(), v.double(), s) ** 2
    got = dora.weight_norm(W, A, B, u, v, s).double() ** 2
    bound = dora.norm_error_bound(W, A, B, u, v, s).double()
    assert torch.all((got - exact).abs() <= bound), ((got - exact).abs() / bound).max()
    relative = ((got.sqrt() - exact.sqrt()).abs() / exact.sqrt())
    if dtype == torch.float32:  # the ordinary rows: about γ/2, as the docstring says
        ordinary = torch.ones(40, dtype=torch.bool)
        ordinary[[0, 7, 19]] = False
        assert relative[ordinary].max() < 1e-5
        stated = bound / exact  # the bound on t's relative error: large exactly where ΔW cancels W0
        assert stated[~ordinary].min() > 1e3 * stated[ordinary].max()


def test_a_low_precision_weight_is_converted_in_row_chunks(monkeypatch):
    (W, A, B, u, v), s = _factors(10, 32, 4, torch.float32)
    monkeypatch.setattr(dora, "ROW_CHUNK", 3)
    got = dora.weight_norm(W.bfloat16(), A, B, u, v, s)
    want = reference.dora_norm(W.bfloat16().double(), A.double(), B.double(), u.double(), v.double(), s)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
