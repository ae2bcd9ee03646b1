"""Every backend kernel is a torch.library custom op whose fake (meta) implementation, schema and
(no) aliasing agree with the real kernel: ``torch.library.opcheck`` on each, for each backend
that runs here, including the placeholders for gradients that are not asked for."""
import pytest
import torch

from peftkern.ops import library, registry
from peftkern.ops.functions import new_seed
from tests.helpers import opcheck


def _backends():
    """Every registered backend that runs CPU tensors here (a new one is checked without a change here)."""
    return [name for name in registry.names()[1:] if opcheck.available_backend(name) is not None]


def _args(kernel, needs, dropout):
    t = opcheck.make_inputs(7, 9, 5, 3)
    x, W, b, A, B, u, v = (t[n].detach() for n in ("x", "weight", "bias", "A", "B", "u", "v"))
    seed = new_seed(dropout)
    h, dy, hu = x @ A.t(), torch.randn(7, 5), torch.randn(7, 3)
    E, W1, b1, W2, b2 = torch.randn(4, 6), torch.randn(8, 6), torch.randn(8), torch.randn(10, 8), torch.randn(10)
    # a 4-bit W0 [5, 9] with double quantization, bitsandbytes' layout (random codes and scales)
    w4 = (torch.randint(0, 256, (23, 1), dtype=torch.uint8), torch.randint(0, 256, (3,), dtype=torch.uint8),
          torch.linspace(-1, 1, 16), torch.rand(1), torch.linspace(-1, 1, 256), torch.rand(1), 16, 256, None, torch.float32)
    return {
        "adapter_forward": (x, W, b, A, B, u, v, 0.5, dropout, seed, True),
        "adapter_backward": (dy, x, W, A, B, u, v, h, None, 0.5, dropout, seed, needs[:7]),
        "shrink_forward": (x, A, u, dropout, seed, True),
        "shrink_backward": (hu, x, A, u, h, dropout, seed, needs[:3]),
        "expand_forward": (x, W, b, hu, B, v, 0.5),
        "expand_backward": (dy, x, W, hu, B, v, 0.5, needs[:6]),
        "hypernet_forward": (E, W1, b1, W2, b2, True),
        "hypernet_backward": (torch.randn(4, 10), E, W1, W2, E @ W1.t() + b1, needs[:5]),
        "dora_scale_forward": (torch.randn(7, 5), torch.rand(5) + 0.5, b),
        "dora_scale_backward": (dy, torch.randn(7, 5), torch.rand(5) + 0.5, b, dropout == 0.0, needs[5], needs[6]),
        "adapter_4bit_forward": (x, *w4, b, A, B, u, v, 0.5, dropout, seed, True),
        "adapter_4bit_backward": (dy, x, *w4, A, B, u, v, h, 0.5, dropout, seed, needs[:5]),
    }[kernel]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kernel", sorted(library.SCHEMAS))
@pytest.mark.parametrize("needs,dropout", [([True] * 7, 0.0), ([True, False, False, True, False, True, False], 0.3)])
def test_opcheck(backend, kernel, needs, dropout):
    if kernel in library.OPTIONAL and getattr(registry.load(backend), kernel) is None:
        pytest.skip(f"{backend} has no {kernel} (optional)")
    op = getattr(torch.ops.peftkern, f"{backend}_{kernel}")
    args = _args(kernel, needs, dropout)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("r", [3, 40])  # a merged forward without W_eff kept (r ≤ 32), and with it
def test_the_cpp_adapter_op_keeps_its_fakes_promise_where_eager_would_merge(r):
    """Eager, the cpp cost model merges W_eff = W0 + ΔW at these sizes, and that path returns no h (and,
    at GEMM-sized ranks, W_eff as aux): not the fake's outputs, which inductor asserts (it crashed a
    compiled training step at 128 tokens). The custom op runs the unmerged choice instead."""
    if "cpp" not in _backends():
        pytest.skip("no C++ extension")
    from peftkern.ops.backends import cpp

    t = opcheck.make_inputs(600, 9, 5, r)
    args = tuple(t[n].detach() for n in ("x", "weight", "bias", "A", "B", "u", "v")) + (0.5, 0.0, new_seed(0.0), True)
    assert cpp.planned_paths(600, 5, 9, r)[0] == "merged"
    _, h_eager, _ = cpp.adapter_forward(*args)
    assert h_eager is None  # what the fake could not promise
    op = torch.ops.peftkern.cpp_adapter_forward
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    y, h, aux = op(*args)
    assert h.shape == (600, r) and aux.numel() == 0
    torch.testing.assert_close(y, cpp.adapter_forward(*args)[0], rtol=1e-5, atol=1e-5)
    with cpp.forced_path("merged"), pytest.raises(ValueError, match="merged path cannot run under torch.compile"):
        op(*args)


def test_the_contracts_kernel_names_are_the_schemas():
    """backend.py names the kernels a backend must provide; library.py gives each a schema (plus the optional
    ones): one list, written twice, must agree."""
    from peftkern.ops import backend

    assert set(backend.KERNEL_NAMES) == set(library.SCHEMAS) - library.OPTIONAL


@pytest.mark.parametrize("backend", _backends())
def test_the_hypernet_op_saves_its_pre_activation_as_its_fake_says_in_bf16(backend):
    """The cpp op saved ``pre`` in bf16 where its fake (and the torch backend) gives the accumulation dtype,
    fp32: opcheck failed, and the backends disagreed on what the backward reads (a review's finding)."""
    if backend == "triton":
        pytest.skip("the interpreter's bf16 dot is wrong (checked in fp32 above)")
    E, W1, b1, W2, b2 = (torch.randn(s).bfloat16() for s in [(4, 6), (8, 6), (8,), (10, 8), (10,)])
    forward = getattr(torch.ops.peftkern, f"{backend}_hypernet_forward")
    torch.library.opcheck(forward, (E, W1, b1, W2, b2, True), test_utils=("test_schema", "test_faketensor"))
    _, pre = forward(E, W1, b1, W2, b2, True)
    assert pre.dtype == library.acc_dtype(torch.bfloat16)
    backward = getattr(torch.ops.peftkern, f"{backend}_hypernet_backward")
    grads = backward(torch.randn(4, 10).bfloat16(), E, W1, W2, pre, [True] * 5)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 5
