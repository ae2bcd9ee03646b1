"""On a GPU: one full training step of every method, in bf16, on each backend that runs CUDA
tensors, against the torch backend (cuBLAS): the loss and every adapter gradient.

Also the default path (auto on CUDA is the torch backend until the Triton kernels pass this
suite), every rank ``patch`` accepts reaching the kernels (r = 256: beyond the Triton
kernels' largest rank block, routed to the torch kernels and said so), and dropout.
Auto-skipped without CUDA (tests/conftest.py).
"""
import pytest
import torch

import peftkern
from tests.models import VOCAB
from tests.models import tiny_model as _tiny

pytestmark = pytest.mark.gpu

METHODS = [
    ("lora", {}),
    ("lora", {"dropout": 0.1}),
    ("tied_lora", {}),
    ("tied_lora", {"joint": True, "targets": ["q_proj", "k_proj", "v_proj"]}),
    ("vera", {}),
    ("pg_fixed", {}),
    ("pg_trainable", {}),
    ("pg_pos", {}),
    ("pg_pos", {"generate": "AB"}),
    ("adalora", {"total_step": 10}),
    ("hyper_adalora", {"total_step": 10}),
    ("hyper_adalora", {"total_step": 10, "hypernet": "mlp"}),
]


def _ids(batch=2, seq=33):
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (batch, seq), generator=g).cuda()


def _step(method, options, backend, rank=8):
    model = _tiny("llama", seed=1).cuda().to(torch.bfloat16)
    torch.manual_seed(7)  # the adapter's initial values (and the dropout seed) identical for each backend
    peftkern.patch(model, method, rank=rank, backend=backend, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # off the zero init, so that every gradient is informative
        for p in model.peftkern.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    model.train()
    ids = _ids()
    torch.manual_seed(11)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.peftkern.named_parameters() if p.requires_grad}
    assert grads and all(t is not None and torch.isfinite(t).all() for t in grads.values())
    return float(loss), grads, model


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: str(v))
def test_training_step_matches_torch_backend(method, options, backend):
    if options.get("dropout") and backend == "triton":
        pytest.skip("each backend draws its own dropout mask; dropout is checked op by op against its mask")
    loss_ref, grads_ref, _ = _step(method, options, "torch")
    loss, grads, model = _step(method, options, backend)
    assert abs(loss - loss_ref) < 2e-2 * abs(loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert _rel(grads[name], grads_ref[name]) < 5e-2, name
    if backend == "auto":  # the default on CUDA is the verified cuBLAS path, and explain() says so
        assert {r["backend"] for r in peftkern.explain(model).rows} == {"torch"}


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
def test_rank_256_runs(backend):
    """VeRA's usual rank crashed the first GPU run (dy_pass needed 344 KB of shared memory)."""
    loss_ref, grads_ref, _ = _step("vera", {}, "torch", rank=256) if backend != "torch" else (None, None, None)
    loss, grads, model = _step("vera", {}, backend, rank=256)
    if loss_ref is not None:
        assert abs(loss - loss_ref) < 2e-2 * abs(loss_ref)
        for name in grads:
            assert _rel(grads[name], grads_ref[name]) < 5e-2, name
    if backend == "triton":
        assert "rank > 128" in peftkern.explain(model).rows[0]["path"]


@pytest.mark.parametrize("r", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_at_large_ranks(r, dtype):
    from peftkern.ops.functions import BoundOps
    from peftkern.triton_kernels import BACKEND
    from tests import opcheck

    opcheck.compare_adapter(BoundOps(BACKEND).adapter, 300, 257, 129, r, dtype=dtype, device="cuda")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_on_cuda(backend, dtype):
    from peftkern.ops import dispatch
    from peftkern.ops.functions import BoundOps
    from tests import opcheck

    b = dispatch.load(backend)
    opcheck.compare_adapter(BoundOps(b).adapter, 300, 257, 129, 8, dtype=dtype, device="cuda", dropout=0.1,
                            mask=b.dropout_mask)
