"""DoRA's op and the fused 4-bit (QLoRA) kernel on a real GPU: the forward and every gradient of
each backend that runs CUDA tensors against the plain-torch reference in fp64 on the CPU, in bf16,
fp16 and fp32, on both DoRA routes, at odd and model-sized shapes; and one training step of a
DoRA model and of a 4-bit model on CUDA against the CPU. Auto-skipped without CUDA
(tests/conftest.py); run by benchmarks/gpu_check.sh.

Tolerances are normwise relative errors (‖ours − ref‖ / ‖ref‖): fp32 through the matrix units
(tf32) lands near 3e-4, bf16 operands between 1e-3 and 1e-2."""
import os
import sys
from pathlib import Path

import pytest
import torch

from peftkern import dora
from peftkern.ops import functions, reference
from peftkern.ops.functions import BoundOps
from tests.helpers import opcheck

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# odd shapes in both dtypes, a model-sized one in bf16 (kept few: the tier must fit gpu_check.sh's limit)
CASES = [(300, 257, 129, 4, torch.bfloat16), (300, 257, 129, 4, torch.float32), (2048, 1536, 576, 64, torch.bfloat16)]
DEVICE = os.environ.get("PEFTKERN_GPU_TEST_DEVICE", "cuda")  # "cpu" checks this file's logic without a GPU


def _on_device(name):
    """The backend ``name`` where it runs CUDA tensors here, else skip the test."""
    from peftkern.ops import registry

    try:
        return registry.resolve(name, DEVICE)
    except registry.BackendUnavailable as exc:
        pytest.skip(f"{name} does not run CUDA tensors here: {exc}")


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(params=["scaled", "folded"])
def route(request, monkeypatch):
    monkeypatch.setattr(functions, "FOLD_MIN_ROWS_PER_FEATURE", 0 if request.param == "folded" else float("inf"))
    return request.param


@pytest.mark.parametrize("M,K,N,r,dtype", CASES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_dora_forward_and_every_gradient(backend, M, K, N, r, dtype, route):
    ops = BoundOps(_on_device(backend))
    t = opcheck.make_inputs(M, K, N, r, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        t["B"].copy_(0.3 * torch.randn(t["B"].shape, generator=g, dtype=torch.float64))
    m = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    dev = {k: (None if v is None else v.detach().to(DEVICE, dtype).requires_grad_(v.requires_grad)) for k, v in t.items()}
    m_dev = m.detach().to(DEVICE, dtype).requires_grad_(True)
    norm = dora.weight_norm(dev["weight"], dev["A"].detach(), dev["B"].detach(), dev["u"].detach(),
                            dev["v"].detach(), 0.5)
    y = ops.dora_adapter(dev["x"], dev["weight"], dev["bias"], dev["A"], dev["B"], dev["u"], dev["v"], m_dev, norm, 0.5)
    want = reference.dora_adapter(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["u"], t["v"], 0.5, m)
    assert y.dtype == dtype and y.shape == want.shape
    assert _rel(y, want) < TOL[dtype], ("forward", _rel(y, want))
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y.backward(dy.to(DEVICE, dtype))
    want.backward(dy)
    for name, ours, ref in [(n, dev[n], t[n]) for n in ("x", "A", "B", "u", "v")] + [("m", m_dev, m)]:
        assert ours.grad is not None, name
        assert _rel(ours.grad, ref.grad) < TOL[dtype], (name, _rel(ours.grad, ref.grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,r", [(257, 129, 4), (5632, 2048, 16)])
def test_dora_norm_of_a_half_weight_keeps_the_fp32_bound(N, K, r, dtype):
    """A bf16/fp16 W0 on CUDA: W0·Aᵀ is one GEMM writing fp32 (``dora.HALF_IN_FP32_OUT``), per module
    and batched; its squared norms stay within the fp32 bound of the fp64 norm of the same weights."""
    g = torch.Generator().manual_seed(2)
    mods = [(torch.randn(N, K, generator=g), torch.randn(r, K, generator=g) * K ** -0.5,
             0.3 * torch.randn(N, r, generator=g)) for _ in range(3)]
    dev = [tuple(t.to(DEVICE, dtype) for t in mod) for mod in mods]
    exact = [tuple(t.double() for t in mod) for mod in dev]
    single = torch.stack([dora.weight_norm(*mod, None, None, 0.5) for mod in dev])
    batched = dora.weight_norms(*([mod[i] for mod in dev] for i in range(3)), [None] * 3, [None] * 3, 0.5,
                                torch.stack([dora.row_norms_sq(mod[0]) for mod in dev]))
    for got in (single, batched):
        assert got.dtype == torch.float32 and got.device.type == DEVICE
        for i, mod in enumerate(exact):
            want = dora.weight_norm(*(t.cpu() for t in mod), None, None, 0.5)
            bound = dora.norm_error_bound(*(t.cpu().float() for t in mod), None, None, 0.5).double()  # fp32's
            err = (got[i].double().cpu() ** 2 - want ** 2).abs()
            assert (err <= bound).all(), float((err / bound).max())


F = None


def _bnb():
    global F
    if F is None:
        F = pytest.importorskip("bitsandbytes.functional")
    return F


def _state(W, quant_type, nested, blocksize=64):
    packed, st = _bnb().quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    s2 = st.state2 if nested else None
    w4 = (packed, st.absmax, st.code, s2.absmax if nested else None, s2.code if nested else None,
          st.offset.reshape(1) if nested else None, st.blocksize, s2.blocksize if nested else 1, None, st.dtype)
    return w4, _bnb().dequantize_4bit(packed, st)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("N,K", [(37, 64), (1536, 576)])
def test_reference_dequantization_is_bitsandbytes_own_on_device(quant_type, nested, N, K):
    w4, want = _state(torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16), quant_type, nested)
    got = reference.dequantize_4bit(*w4[:8], N, K)
    assert got.device.type == DEVICE
    assert _rel(got, want) < 1e-2  # bf16 storage of the same products


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("M,K,N,r,dtype", [(7, 64, 37, 3, torch.float32), (300, 576, 129, 8, torch.bfloat16),
                                           (2048, 576, 1536, 16, torch.bfloat16)])
def test_fused_4bit_kernel_forward_and_every_gradient(M, K, N, r, quant_type, nested, dtype):
    tk = pytest.importorskip("peftkern.ops.backends.triton")
    ops = BoundOps(tk.BACKEND)
    torch.manual_seed(0)
    w4, W = _state(torch.randn(N, K, device=DEVICE, dtype=dtype) * K ** -0.5, quant_type, nested)
    Wd = W.double().cpu()
    g = torch.Generator().manual_seed(2)
    ref = {"x": torch.randn(M, K, generator=g, dtype=torch.float64),
           "A": torch.randn(r, K, generator=g, dtype=torch.float64) * K ** -0.5,
           "B": torch.randn(N, r, generator=g, dtype=torch.float64) * r ** -0.5,
           "u": 1 + 0.5 * torch.randn(r, generator=g, dtype=torch.float64),
           "v": 1 + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)}
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    dev = {k: v.to(DEVICE, dtype).requires_grad_(True) for k, v in ref.items()}
    ref = {k: v.requires_grad_(True) for k, v in ref.items()}
    y = ops.adapter_4bit(dev["x"], w4, bias.to(DEVICE, dtype), dev["A"], dev["B"], dev["u"], dev["v"], 0.7)
    want = reference.adapter(ref["x"], Wd, bias, ref["A"], ref["B"], ref["u"], ref["v"], 0.7)
    assert y.dtype == dtype
    assert _rel(y, want) < TOL[dtype], ("forward", _rel(y, want))
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y.backward(dy.to(DEVICE, dtype))
    want.backward(dy)
    for name in ref:
        assert _rel(dev[name].grad, ref[name].grad) < TOL[dtype], (name, _rel(dev[name].grad, ref[name].grad))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cpp"])  # cpp: DoRA as one C++ node
def test_dora_model_step_on_device_matches_the_cpu(backend):
    from tests.gpu.test_gpu_training import _assert_like_the_cpu

    if backend != "auto":
        _on_device(backend)
    _assert_like_the_cpu("lora", {"use_dora": True}, backend)


@pytest.mark.parametrize("method", ["lora", "pg_pos"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_4bit_model_step_on_device_matches_its_dequantized_twin(method, backend, tmp_path):
    """A tiny Llama quantized to NF4 on CUDA (bf16 compute), patched, against its dequantized bf16 twin
    patched the same way on the torch backend: the loss and every adapter gradient."""
    _bnb()
    import copy

    import peftkern
    from peftkern import quant
    from tests.helpers.models import tokens
    from tests.helpers.quantized import tiny_llama_64

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from common import to_4bit  # QLoRA's base from the same weights, as the GPU step benchmark builds it

    base = tiny_llama_64().to(DEVICE, torch.bfloat16)
    m4 = copy.deepcopy(base)
    to_4bit(m4.model.layers, torch.bfloat16, DEVICE)  # bitsandbytes quantizes each layer as it moves to CUDA
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in m4.named_modules():
            if quant.kind(module):
                twin.get_submodule(name).weight.copy_(quant.dequantized(module))
    q = peftkern.patch(m4, method, rank=4, backend=backend)
    r = peftkern.patch(twin, method, rank=4, backend="torch")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in q.peftkern.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    r.peftkern.load_state_dict(q.peftkern.state_dict())
    q.train(), r.train()
    ids = tokens().to(DEVICE)
    lq, lr = q(input_ids=ids, labels=ids).loss, r(input_ids=ids, labels=ids).loss
    assert abs(float(lq) - float(lr)) < 2e-2 * abs(float(lr))
    lq.backward(), lr.backward()
    for (name, a), (_, b) in zip(q.peftkern.named_parameters(), r.peftkern.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert _rel(a.grad, b.grad) < 5e-2, (name, _rel(a.grad, b.grad))
    if backend == "triton":
        assert all(row["path"].startswith("4bit base fused") for row in peftkern.explain(q).rows)
