"""The Triton backend's ops against the plain-torch reference, on the CPU under the
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""
import pytest
import torch

pytest.importorskip("triton")
from peftkern.ops import reference  # noqa: E402
from peftkern.ops.backends import triton as tk  # noqa: E402
from peftkern.ops.functions import BoundOps  # noqa: E402
from tests.helpers import opcheck  # noqa: E402

ops = BoundOps(tk.BACKEND)  # the bundle the registry hands to AdaptedLinear, with its ops bound

VARIANTS = tk.FORWARD_VARIANTS


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Run a test under each forward variant, restoring the default afterwards."""
    with tk.forward_variant(request.param):
        yield request.param


# --- adapter: forward and every gradient --------------------------------------------------

@pytest.mark.parametrize("M,K,N,r", opcheck.ODD_SHAPES)
def test_adapter_matches_reference_fp32(M, K, N, r, variant):
    opcheck.compare_adapter(ops.adapter, M, K, N, r)


@pytest.mark.parametrize("M,K,N,r", [(37, 123, 45, 4), (19, 33, 70, 16), (5, 9, 3, 1)])
def test_adapter_matches_reference_fp64(M, K, N, r, variant):
    """The interpreter runs tl.dot in fp64, so this holds to opcheck's 1e-10."""
    opcheck.compare_adapter(ops.adapter, M, K, N, r, dtype=torch.float64)


@pytest.mark.parametrize("trained", ["xABuv", "xAB", "AB", "xB", "xA", "uv", "xuv", "Bu", "Auv", "x"])
@pytest.mark.parametrize("bias,u,v", [(True, True, True), (False, False, False), (True, False, True)])
def test_adapter_gradients_only_for_trained(trained, bias, u, v):
    opcheck.compare_adapter(ops.adapter, 37, 123, 45, 4, bias=bias, u=u, v=v, trained=trained)


@pytest.mark.parametrize("trained", ["xABuv", "Bu", "x"])
def test_adapter_trained_subsets_in_loop_variant(trained, variant):
    opcheck.compare_adapter(ops.adapter, 19, 33, 70, 16, bias=False, trained=trained)


def test_adapter_batched_leading_dims(variant):
    opcheck.compare_adapter(ops.adapter, 7, 33, 20, 4, lead=(3,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_half_precision_matches_fp64_reference_normwise(dtype, variant):
    opcheck.compare_adapter(ops.adapter, 37, 64, 48, 8, dtype=dtype)


def test_adapter_gradcheck_fp64():
    assert opcheck.gradcheck_adapter(ops.adapter)


def test_adapter_transposed_weight_and_strided_inputs(variant):
    """GPT-2's Conv1D passes weight.t(); x and dy may be non-contiguous views too."""
    M, K, N, r = 13, 21, 17, 4
    g = torch.Generator().manual_seed(11)
    w_kn = torch.randn(K, N, generator=g)  # Conv1D storage: [in, out]
    weight = w_kn.t()
    assert not weight.is_contiguous()
    x_big = torch.randn(M, 2 * K, generator=g)
    x = x_big[:, ::2].requires_grad_(False)  # a strided view, not contiguous
    x = x.detach().requires_grad_(True)
    A = (torch.randn(r, K, generator=g) * 0.3).requires_grad_(True)
    B = (torch.randn(N, r, generator=g) * 0.3).requires_grad_(True)
    bias = torch.randn(N, generator=g)
    gy = torch.randn(N, M, generator=g).t()  # non-contiguous upstream gradient
    y = ops.adapter(x, weight, bias, A, B, None, None, 0.5)
    xr, Ar, Br = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    yr = reference.adapter(xr, weight.double(), bias.double(), Ar, Br, None, None, 0.5)
    torch.testing.assert_close(y.double(), yr, rtol=2e-5, atol=2e-5)
    y.backward(gy)
    yr.backward(gy.double())
    for t, tr in ((x, xr), (A, Ar), (B, Br)):
        torch.testing.assert_close(t.grad.double(), tr.grad, rtol=2e-5, atol=2e-5)


def test_weight_and_bias_gradients_when_unfrozen():
    inp = opcheck.make_inputs(4, 5, 3, 2, dtype=torch.float64)
    inp["weight"].requires_grad_(True)
    inp["bias"].requires_grad_(True)
    args = [inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")]
    assert torch.autograd.gradcheck(lambda *a: ops.adapter(*a, 0.7), args)


def test_adapter_saves_only_x_and_ax(variant):
    """Backward keeps x and h = x·Aᵀ (plus the parameters), never an M×N intermediate."""
    M, K, N, r = 37, 23, 29, 4
    sizes = opcheck.saved_numels(ops.adapter, M, K, N, r)
    activations = sorted(s for s in sizes if s not in (N * K, r * K, N * r, r, N))
    assert activations == sorted([M * K, M * r]), sizes
    assert M * N not in sizes


@pytest.mark.parametrize("trained,kept", [("B", ["h"]), ("xA", ["x"])])
def test_adapter_saves_only_what_its_gradients_read(trained, kept):
    """x is only read by dA, h only by dB/du/dv: training B alone keeps no M×K tensor."""
    M, K, N, r = 37, 23, 29, 4
    sizes = opcheck.saved_numels(ops.adapter, M, K, N, r, trained=trained)
    activations = sorted(s for s in sizes if s not in (N * K, r * K, N * r, r, N))
    assert activations == sorted({"x": M * K, "h": M * r}[k] for k in kept), sizes


# --- joint form: shrink + expand --------------------------------------------------------

@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("u,v", [(True, True), (False, False), (True, False)])
def test_joint_shrink_expand_matches_reference(r, u, v):
    opcheck.compare_joint(ops.shrink, ops.expand, 37, 33, [33, 17, 19], r, u=u, v=v)


def test_joint_fp64():
    opcheck.compare_joint(ops.shrink, ops.expand, 21, 19, [19, 11], 4, dtype=torch.float64)


def test_joint_gradcheck_fp64():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, dtype=torch.float64, requires_grad=True)
    W, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, u, B, v: ops.expand(x, W, b, ops.shrink(x, A, u), B, v, 0.3),
                                    (x, A, u, B, v))


def test_shrink_keeps_leading_dims():
    x = torch.randn(2, 5, 9)
    A = torch.randn(3, 9)
    u = torch.randn(3)
    torch.testing.assert_close(ops.shrink(x, A, u), reference.shrink(x, A, u), rtol=1e-5, atol=1e-5)


def test_grad_a_split_reduction_matches_matmul():
    """dA = dhᵀ·x reduced over several M-splits with atomics equals one matmul."""
    from peftkern_triton.adapter_backward import grad_a

    g = torch.Generator().manual_seed(2)
    dh, x = torch.randn(150, 5, generator=g), torch.randn(150, 37, generator=g)
    for split in (1, 3, 7):
        torch.testing.assert_close(grad_a(dh, x, out_dtype=torch.float32, split=split), dh.t() @ x,
                                   rtol=1e-5, atol=1e-5)


# --- hypernetwork generation --------------------------------------------------------------

@pytest.mark.parametrize("L,h_in,h2,P", [(1, 3, 5, 7), (24, 16, 32, 100), (37, 7, 40, 70)])
def test_hypernet_matches_reference(L, h_in, h2, P):
    opcheck.compare_hypernet(ops.hypernet, L, h_in, h2, P)


def test_hypernet_fp64():
    opcheck.compare_hypernet(ops.hypernet, 24, 16, 32, 100, dtype=torch.float64)


def test_hypernet_bf16_normwise():
    opcheck.compare_hypernet(ops.hypernet, 24, 16, 32, 100, dtype=torch.bfloat16)


@pytest.mark.parametrize("trained", ["W2b2", "E", "W1b1"])
def test_hypernet_gradients_only_for_trained(trained):
    opcheck.compare_hypernet_trained(ops.hypernet, trained)


# --- launch counts, flags and bad input ---------------------------------------------------

def test_launch_counts_per_forward_and_backward():
    inp = opcheck.make_inputs(9, 7, 5, 2)
    expected = {"prior_shrink": {"shrink": 1, "lowrank_gemm": 1}, "in_loop": {"lowrank_gemm": 1}}
    for name, fwd in expected.items():
        with tk.forward_variant(name):
            tk.reset_launch_counts()
            y = ops.adapter(*(inp[n] for n in ("x", "weight", "bias", "A", "B", "u", "v")), 0.5)
            assert tk.launch_counts() == fwd, name
        tk.reset_launch_counts()
        y.sum().backward()
        # one pass over dy, one GEMM for dx, one pass over x for dA
        assert tk.launch_counts() == {"dy_pass": 1, "lowrank_gemm": 1, "grad_a": 1}
    assert tk.current_forward_variant() == "prior_shrink"  # the block restores the default


def test_hypernet_generates_all_layers_in_one_launch():
    tk.reset_launch_counts()
    E = torch.randn(40, 8)  # more layers than one L block of the fixed config
    out = ops.hypernet(E, torch.randn(16, 8), torch.randn(16), torch.randn(50, 16), torch.randn(50))
    assert out.shape == (40, 50)
    assert tk.launch_counts() == {"hypernet_fwd": 1}


def test_unknown_forward_variant_names_the_choices():
    with pytest.raises(ValueError, match="prior_shrink.*in_loop"):
        with tk.forward_variant("fastest"):
            pass


def test_unsupported_dtype_raises_type_error():
    x = torch.ones(3, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="bfloat16"):
        ops.adapter(x, torch.ones(2, 4, dtype=torch.int32), None, torch.ones(1, 4, dtype=torch.int32),
                   torch.ones(2, 1, dtype=torch.int32), None, None, 1.0)


def test_mixed_dtypes_raise_type_error_naming_the_operand():
    inp = opcheck.make_inputs(3, 4, 2, 1)
    with pytest.raises(TypeError, match="A: torch.float64"):
        ops.adapter(inp["x"], inp["weight"], None, inp["A"].double(), inp["B"], None, None, 1.0)


def test_backend_bundle_is_registered_under_triton():
    from peftkern.ops import registry

    backend = registry.load("triton")
    assert backend is tk.BACKEND and backend.name == "triton"
    assert registry.resolve("triton", "cpu") is backend  # runs on CPU under the interpreter
