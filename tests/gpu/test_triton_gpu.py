"""The Triton backend on a real GPU: the op matrix in bf16 and fp16 (and fp32), both forward
variants, the autotuned kernels. Auto-skipped without CUDA (tests/conftest.py); run by
benchmarks/gpu_check.sh, sized to finish there in about five minutes with 8 workers."""
import pytest
import torch

pytest.importorskip("triton")
from peftkern.ops.backends import triton as tk  # noqa: E402
from peftkern.ops.functions import BoundOps  # noqa: E402
from tests.helpers import opcheck  # noqa: E402

ops = BoundOps(tk.BACKEND)  # the bundle the registry hands to AdaptedLinear, with its ops bound

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
SHAPES = opcheck.ODD_SHAPES[:3] + [(300, 257, 129, 32), (513, 1024, 1024, 16)]
# the subsets that failed on the first GPU run (Gt or du not asked for) and the full one
SUBSETS = ["xABuv", "xAB", "AB", "xB", "x", "xuv", "Auv"]


@pytest.fixture(params=tk.FORWARD_VARIANTS)
def variant(request):
    with tk.forward_variant(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
def test_adapter_half_precision(M, K, N, r, dtype, variant):
    opcheck.compare_adapter(ops.adapter, M, K, N, r, dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp16 by the shape tests: the tier must fit gpu_check's limit
@pytest.mark.parametrize("trained", SUBSETS)
@pytest.mark.parametrize("bias,u,v", [(True, True, True), (False, False, False), (True, False, True)])
def test_adapter_trained_subsets(trained, bias, u, v, dtype):
    opcheck.compare_adapter(ops.adapter, 300, 257, 129, 4, dtype=dtype, device="cuda", bias=bias, u=u, v=v,
                            trained=trained)


@pytest.mark.parametrize("M,K,N,r", SHAPES[2:4])
def test_adapter_fp32_ieee(M, K, N, r, variant):
    opcheck.compare_adapter(ops.adapter, M, K, N, r, dtype=torch.float32, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_leading_dims(dtype, variant):
    opcheck.compare_adapter(ops.adapter, 64, 96, 80, 8, dtype=dtype, device="cuda", lead=(3,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("u,v", [(True, True), (False, False)])
def test_joint(dtype, r, u, v):
    opcheck.compare_joint(ops.shrink, ops.expand, 300, 257, [257, 129, 129], r, dtype=dtype, device="cuda", u=u, v=v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,h_in,h2,P", [(1, 3, 5, 7), (24, 16, 32, 100), (37, 64, 40, 4099)])
def test_hypernet(L, h_in, h2, P, dtype):
    opcheck.compare_hypernet(ops.hypernet, L, h_in, h2, P, dtype=dtype, device="cuda")


def test_model_bf16_matches_torch_backend():
    import peftkern
    from tests.helpers.models import tiny_model, tokens

    ids = tokens().cuda()
    logits = {}
    for backend in ("torch", "triton"):
        model = peftkern.patch(tiny_model("llama").cuda().to(torch.bfloat16), "lora", rank=4, backend=backend)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.peftkern.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p))
        out = model(ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is not None for p in model.peftkern.parameters() if p.requires_grad)
        assert peftkern.explain(model).rows[0]["backend"] == backend
        logits[backend] = out.logits.float()
    err = (logits["triton"] - logits["torch"]).norm() / logits["torch"].norm()
    assert err < 2e-2


@pytest.mark.parametrize("M,K,N,r", [(0, 64, 48, 8), (32, 0, 48, 8), (32, 64, 0, 8)])
def test_adapter_empty_shapes(M, K, N, r):
    """No tokens, no input or no output features: a grid with no programs, and nn.Linear's result."""
    opcheck.compare_adapter(ops.adapter, M, K, N, r, dtype=torch.bfloat16, device="cuda", lead=(2,))
