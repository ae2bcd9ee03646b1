"""The fused QLoRA kernel (a bitsandbytes 4-bit W0 dequantized tile by tile in the adapter's GEMM), on the
CPU under the interpreter: the torch reference dequantization equals bitsandbytes' own; the op's forward
and every gradient equal the reference adapter on the dequantized weight (NF4 and FP4, with and without
double quantization, odd shapes, partial blocks); dropout draws the dense op's mask; and a 4-bit model
patched with backend="triton" runs it and matches its dequantized twin."""
import copy

import pytest
import torch

pytest.importorskip("triton")
F = pytest.importorskip("bitsandbytes.functional")
bitsandbytes = pytest.importorskip("bitsandbytes")

import peftkern  # noqa: E402
from peftkern import quant  # noqa: E402
from peftkern.ops import reference  # noqa: E402
from peftkern.ops.backends import triton as tk  # noqa: E402
from peftkern.ops.functions import BoundOps  # noqa: E402
from tests.helpers.adapters import perturb  # noqa: E402
from tests.helpers.models import tokens  # noqa: E402
from tests.helpers.quantized import assert_matches_twin, tiny_4bit  # noqa: E402

ops = BoundOps(tk.BACKEND)
FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
SHAPES = [(7, 37, 23, 3), (5, 64, 64, 8), (3, 130, 9, 1)]  # N·K not a multiple of the block; K odd; r = 1


def _state(W, quant_type, nested, blocksize=64):
    packed, st = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    s2 = st.state2 if nested else None
    w4 = (packed, st.absmax, st.code, s2.absmax if nested else None, s2.code if nested else None,
          st.offset.reshape(1) if nested else None, st.blocksize, s2.blocksize if nested else 1, None, st.dtype)
    return w4, F.dequantize_4bit(packed, st)


@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("N,K", [(37, 23), (64, 64), (5, 300), (1, 1)])
def test_reference_dequantization_is_bitsandbytes_own(quant_type, nested, N, K):
    w4, want = _state(torch.randn(N, K), quant_type, nested)
    torch.testing.assert_close(reference.dequantize_4bit(*w4[:8], N, K), want, rtol=0, atol=0)


@pytest.mark.parametrize("variant", tk.FORWARD_VARIANTS)
@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
def test_forward_and_every_gradient_match_the_reference_on_the_dequantized_weight(M, K, N, r, quant_type, nested,
                                                                                    variant):
    with tk.forward_variant(variant):
        assert_matches_reference(M, K, N, r, quant_type, nested)


def assert_matches_reference(M, K, N, r, quant_type, nested, bias=True):
    """The fused 4-bit op against the reference adapter on the dequantized W0: output, every gradient."""
    torch.manual_seed(0)
    w4, W = _state(torch.randn(N, K), quant_type, nested)
    x, A, B = torch.randn(M, K), torch.randn(r, K), torch.randn(N, r)
    u, v, b = torch.randn(r), torch.randn(N), (torch.randn(N) if bias else None)
    ours = [t.clone().requires_grad_(True) for t in (x, A, B, u, v)]
    refs = [t.clone().requires_grad_(True) for t in (x, A, B, u, v)]
    y = ops.adapter_4bit(ours[0], w4, b, *ours[1:], 0.7)
    want = reference.adapter(refs[0], W, b, refs[1], refs[2], refs[3], refs[4], 0.7)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    for name, a, b in zip("xABuv", ours, refs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)


# (dtype W0 was quantized from, the layer's compute dtype, x's dtype): an fp32 model with a bf16/fp16 compute
# dtype (transformers' BitsAndBytesConfig(bnb_4bit_compute_dtype=...) on an fp32 load), and a bf16 checkpoint
# computed in fp32; the Triton interpreter runs only fp32/fp64 inputs correctly
ROUNDINGS = [(torch.float32, torch.bfloat16, torch.float32), (torch.float32, torch.float16, torch.float32),
             (torch.bfloat16, torch.float32, torch.float32), (torch.bfloat16, None, torch.float32)]


@pytest.mark.parametrize("weight_dtype,compute_dtype,dtype", ROUNDINGS)
def test_the_base_product_rounds_as_bitsandbytes_own(weight_dtype, compute_dtype, dtype):
    """The fused op's W0·x + b is bitsandbytes' ``matmul_4bit`` (x and W0 in the layer's compute dtype, W0
    through the dtype it was quantized from, the product rounded to the compute dtype), not the
    exact product in x's dtype, so that the triton backend computes what PEFT's QLoRA layer does.
    Forward and dx (whose base part dy·W0 rounds the same way) against the reference, and the
    forward against bitsandbytes' op itself plus the low-rank term."""
    torch.manual_seed(3)
    # K a multiple of 64: bitsandbytes 0.50's CPU dequantization is wrong where a block straddles two rows
    # with K % 64 = 32 (e.g. [40, 96]); its CUDA one is not checked here
    M, K, N, r = 13, 128, 40, 4
    packed, st = F.quantize_4bit(torch.randn(N, K).to(weight_dtype) * K ** -0.5, blocksize=64, quant_type="nf4",
                                 compress_statistics=True)
    w4 = (packed, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset.reshape(1), st.blocksize,
          st.state2.blocksize, compute_dtype, st.dtype)
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    A, B = torch.randn(r, K, dtype=dtype) * K ** -0.5, torch.randn(N, r, dtype=dtype)
    compute = compute_dtype or dtype
    bias = torch.randn(N, dtype=compute)
    y = ops.adapter_4bit(x, w4, bias, A, B, None, None, 0.5)
    xr = x.detach().clone().requires_grad_(True)
    want = reference.adapter_4bit(xr, w4, bias, A, B, None, None, 0.5)

    def assert_rounded_alike(got, want):
        """Equal to fp32 summation order, but for the few elements whose rounding to the compute dtype
        that order flips (by one ulp of it)."""
        scale = want.detach().abs().amax()
        off = (got.detach() - want.detach()).abs()
        fp32 = 8 * torch.finfo(torch.float32).eps * scale
        assert off.amax() <= max(torch.finfo(compute).eps * scale, fp32), off.amax()
        assert (off <= fp32).float().mean() >= 0.97
        return off

    assert_rounded_alike(y, want)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    assert_rounded_alike(x.grad, xr.grad)
    # bitsandbytes' own op (as its Linear4bit calls it), plus the low-rank term
    base = bitsandbytes.matmul_4bit(x.detach().to(compute), packed.t(), bias=bias, quant_state=st).to(dtype)
    assert_rounded_alike(y, base + 0.5 * (x.detach() @ A.t() @ B.t()))
    if compute != dtype:  # what the kernel computed before, the exact product in x's dtype, is not that
        exact = reference.adapter(x.detach(), reference.dequantize_4bit(*w4[:8], N, K), bias.to(dtype), A, B, None,
                                  None, 0.5)
        with pytest.raises(AssertionError):
            assert_rounded_alike(exact, want)


def test_frozen_factors_get_no_gradient_and_leading_dims_stay():
    torch.manual_seed(1)
    w4, W = _state(torch.randn(20, 33), "nf4", True)
    x = torch.randn(2, 3, 33, requires_grad=True)
    A, B = torch.randn(4, 33), torch.randn(20, 4, requires_grad=True)
    y = ops.adapter_4bit(x, w4, None, A, B, None, None, 0.5)
    assert y.shape == (2, 3, 20)
    y.sum().backward()
    want_x = x.detach().clone().requires_grad_(True)
    reference.adapter(want_x, W, None, A, B.detach(), None, None, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, want_x.grad, rtol=1e-4, atol=1e-4)
    assert A.grad is None and B.grad is not None


def test_dropout_draws_the_dense_ops_mask():
    torch.manual_seed(2)
    w4, W = _state(torch.randn(24, 40), "nf4", True)
    x, A, B = torch.randn(9, 40), torch.randn(4, 40), torch.randn(24, 4)
    torch.manual_seed(7)
    y4 = ops.adapter_4bit(x, w4, None, A, B, None, None, 1.0, 0.3)
    torch.manual_seed(7)
    y = ops.adapter(x, W, None, A, B, None, None, 1.0, 0.3)
    torch.testing.assert_close(y4, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "vera", "pg_pos"])
def test_a_4bit_model_on_the_triton_backend_runs_the_fused_kernel(tmp_path, method):
    m4, twin, _ = tiny_4bit(tmp_path)
    q = peftkern.patch(copy.deepcopy(m4), method, rank=4, backend="triton")
    r = peftkern.patch(copy.deepcopy(twin), method, rank=4)
    perturb(q)
    r.peftkern.load_state_dict(q.peftkern.state_dict())
    assert all(row["path"].startswith("4bit base fused") for row in peftkern.explain(q).rows)
    tk.reset_launch_counts()
    assert assert_matches_twin(q, r, tokens(), dict(rtol=1e-4, atol=1e-5)) > 0
    # one launch per module forward, one per dx (not in layer 0, whose input needs no gradient)
    rows = peftkern.explain(q).rows
    assert tk.launch_counts().get("lowrank_gemm", 0) == len(rows) + sum(".layers.0." not in r["module"] for r in rows)
    assert all(m.weight.grad is None for m in q.modules() if quant.kind(m))


def test_an_fp32_model_with_a_bf16_compute_dtype_computes_what_bitsandbytes_does(tmp_path):
    """An fp32 model loaded with ``bnb_4bit_compute_dtype=torch.bfloat16``: the fused kernel (backend="triton")
    and bitsandbytes' own op plus the low-rank term (backend="torch", PEFT's QLoRA layer's computation)
    give the same logits and adapter gradients. Before the kernel rounded as bitsandbytes does, they
    differed by 2.8e-3 in the logits and 4e-3 to 5e-3 (relative) in the gradients."""
    m4, _, _ = tiny_4bit(tmp_path, compute=torch.bfloat16)
    q = peftkern.patch(copy.deepcopy(m4), "lora", rank=4, backend="triton")
    r = peftkern.patch(copy.deepcopy(m4), "lora", rank=4, backend="torch")
    perturb(q)
    r.peftkern.load_state_dict(q.peftkern.state_dict())
    assert all(row["path"].startswith("4bit base fused") for row in peftkern.explain(q).rows)
    assert assert_matches_twin(q, r, tokens(), dict(rtol=1e-5, atol=1e-5)) > 0
