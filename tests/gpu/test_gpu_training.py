"""On a GPU: one full training step of every method, in bf16, on each backend that runs CUDA
tensors, against the torch backend (cuBLAS): the loss and every adapter gradient.

Also the default path (auto on CUDA is the torch backend until the Triton kernels pass this
suite), every rank ``patch`` accepts reaching the kernels (r = 256: beyond the Triton
kernels' largest rank block, routed to the torch kernels and said so), and dropout.
Auto-skipped without CUDA (tests/conftest.py).
"""
import os

import pytest
import torch
import transformers as T

import peftkern
from tests.helpers.models import VOCAB
from tests.helpers.models import tiny_model as _tiny

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("PEFTKERN_GPU_TEST_DEVICE", "cuda")  # "cpu" checks this file's logic without a GPU


def _wide(seed=1):
    """Wide enough for r = 256: q_proj 512 -> 512, v_proj 512 -> 256."""
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=512, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB))

METHODS = [
    ("lora", {}),
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
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def _step(method, options, backend, rank=8, device=DEVICE, dtype=torch.bfloat16, build=None):
    model = (build or (lambda: _tiny("llama", seed=1)))().to(device=device, dtype=dtype)
    torch.manual_seed(7)  # the adapter's initial values (and the dropout seed) identical for each backend
    peftkern.patch(model, method, rank=rank, backend=backend, **options)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # off the zero init, so that every gradient is informative
        for p in model.peftkern.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    model.train()
    ids = _ids().to(device)
    torch.manual_seed(11)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.peftkern.named_parameters() if p.requires_grad}
    assert grads and all(t is not None and torch.isfinite(t).all() for t in grads.values())
    return float(loss.detach()), grads, model


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _assert_like_the_cpu(method, options, backend, **kw):
    """The step on this device in bf16 against the same step on the CPU in fp32 (the torch backend,
    verified by the CPU suite). The tolerance is bf16's own error on that step, measured: three times
    the error of the CPU torch backend in bf16, and at least 5e-2 (loss: 2e-2)."""
    loss32, grads32, _ = _step(method, options, "torch", device="cpu", dtype=torch.float32, **kw)
    loss16, grads16, _ = _step(method, options, "torch", device="cpu", **kw)
    loss, grads, model = _step(method, options, backend, **kw)
    assert abs(loss - loss32) <= max(2e-2 * abs(loss32), 3 * abs(loss16 - loss32))
    assert grads.keys() == grads32.keys()
    for name in grads:
        floor = _rel(grads16[name], grads32[name])
        assert _rel(grads[name].cpu(), grads32[name]) <= max(5e-2, 3 * floor), (name, floor)
    return model


def _cpp_runs_cuda() -> bool:
    from peftkern.ops import registry

    try:
        return "cuda" in registry.load("cpp").devices
    except registry.BackendUnavailable:
        return False


@pytest.mark.parametrize("backend", ["auto", "triton", "cpp"])
@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: str(v))
def test_training_step_matches_the_cpu(method, options, backend):
    """The default CUDA path (auto: the torch kernels on cuBLAS), the Triton kernels, and the C++
    backend (its adapter one C++ autograd node; only with a CUDA build of the extension), in bf16."""
    if backend == "cpp" and not _cpp_runs_cuda():
        pytest.skip("the C++ extension is not built with CUDA here (benchmarks/gpu_check.sh builds it when nvcc "
                    "and ninja are present)")
    model = _assert_like_the_cpu(method, options, backend)
    if backend == "auto":  # the default on CUDA is the cuBLAS path, and explain() says so
        assert {r["backend"] for r in peftkern.explain(model).rows} == {"torch"}


def test_dropout_trains_on_cuda():
    loss, grads, model = _step("lora", {"dropout": 0.1}, "auto")
    assert loss == loss and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
def test_rank_256_runs(backend):
    """VeRA's usual rank crashed the first GPU run (dy_pass needed 344 KB of shared memory)."""
    model = _assert_like_the_cpu("vera", {}, backend, rank=256, build=_wide)
    if backend == "triton":
        assert "rank 256 > triton's 128: on torch" in peftkern.explain(model).rows[0]["backend"]


@pytest.mark.parametrize("r", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_at_large_ranks(r, dtype):
    from peftkern.ops.backends.triton import BACKEND
    from peftkern.ops.functions import BoundOps
    from tests.helpers import opcheck

    opcheck.compare_adapter(BoundOps(BACKEND).adapter, 300, 257, 129, r, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_on_cuda(backend, dtype):
    from peftkern.ops import registry
    from peftkern.ops.functions import BoundOps
    from tests.helpers import opcheck

    b = registry.load(backend)
    opcheck.compare_adapter(BoundOps(b).adapter, 300, 257, 129, 8, dtype=dtype, device=DEVICE, dropout=0.1,
                            mask=b.dropout_mask)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_trained_factors_cast_together_train_like_cast_alone(use_dora, monkeypatch):
    """The fp32 adapter of a bf16 model: from the second forward its trained factors are cast together
    (peftkern.casts: one multi-tensor copy each way, torch._foreach_copy_ on CUDA), and train as they
    did cast one by one (compared to CUDA's own run-to-run tolerance, not bit for bit: attention's
    backward may sum in another order)."""
    from peftkern import casts

    def run():
        model = _tiny("llama", seed=1).to(device=DEVICE, dtype=torch.bfloat16)
        torch.manual_seed(7)
        peftkern.patch(model, "lora", rank=8, targets="all-linear", use_dora=use_dora)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids, losses = _ids().to(DEVICE), []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        return losses, {n: p.detach().float() for n, p in model.peftkern.named_parameters()}

    calls = []
    real = casts._CastAll.apply
    monkeypatch.setattr(casts._CastAll, "apply", lambda *a: calls.append(1) or real(*a))
    together = run()
    assert len(calls) == 2  # the second and third forwards
    monkeypatch.setattr(casts.Casts, "_begin", lambda self, module, args: None)
    alone = run()
    assert together[0] == pytest.approx(alone[0], rel=1e-3)
    for name, value in alone[1].items():
        torch.testing.assert_close(together[1][name], value, rtol=2e-2, atol=1e-3)
