"""The foreach importance update (the path on CUDA, and on the CPU without the extension): bit
for bit the per-tensor reference, which is PEFT's update_ipt.

AdaLoRA prunes by thresholding these scores, so a one-ulp difference can change which rank
component is dropped: the checks are torch.equal, never allclose.
"""
import pytest
import torch

from peftkern.ops import importance, registry

# odd sizes, one element, an empty tensor
SHAPES = [(8, 123), (45, 8), (8, 1), (1,), (0, 4), (300, 257)]


def _scores(dtype, steps, update, beta1, beta2):
    e = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    u = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        # mixed magnitudes, down to the denormal range, so that every rounding shows
        p = [(torch.randn(s, generator=g) * 10.0 ** torch.randint(-20, 3, s, generator=g)).to(dtype) for s in SHAPES]
        d = [(torch.randn(s, generator=g) * 10.0 ** torch.randint(-20, 2, s, generator=g)).to(dtype) for s in SHAPES]
        update(p, d, e, u, beta1, beta2)
    return e, u


@pytest.mark.parametrize("beta1,beta2", [(0.85, 0.85), (0.9, 0.999), (0.1, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_foreach_update_is_bit_exact(dtype, beta1, beta2):
    e_ref, u_ref = _scores(dtype, 4, importance.update_reference_, beta1, beta2)
    e, u = _scores(dtype, 4, importance.update_foreach_, beta1, beta2)
    for i, (a, b, c, d) in enumerate(zip(e, e_ref, u, u_ref)):
        assert torch.equal(a, b), f"exp_avg_ipt[{i}] differs in {(a != b).sum()} elements"
        assert torch.equal(c, d), f"exp_avg_unc[{i}] differs in {(c != d).sum()} elements"
    assert any(t.abs().sum() > 0 for t in u_ref)  # the scores actually moved


def _spy(monkeypatch, name):
    calls = []
    real = getattr(importance, name)
    monkeypatch.setattr(importance, name, lambda *a: calls.append(name) or real(*a))
    return calls


def test_tensors_the_extension_does_not_serve_take_the_foreach_path(monkeypatch):
    calls = _spy(monkeypatch, "update_foreach_")
    p, g = [torch.randn(3, 4, device="meta")], [torch.randn(3, 4, device="meta")]
    e, u = [torch.zeros(3, 4, device="meta")], [torch.zeros(3, 4, device="meta")]
    assert importance.update_(registry.load("torch"), p, g, e, u, 0.85, 0.85) == "torch"
    assert importance.update_(registry.load("cpp"), p, g, e, u, 0.85, 0.85) == "torch"  # not CPU tensors
    assert calls == ["update_foreach_"] * 2


def test_tensors_on_several_devices_take_the_per_tensor_path(monkeypatch):
    calls = _spy(monkeypatch, "update_reference_")
    p = [torch.ones(2), torch.ones(2, device="meta")]
    e, u = [torch.zeros(2), torch.zeros(2, device="meta")], [torch.zeros(2), torch.zeros(2, device="meta")]
    assert importance.update_(registry.load("torch"), p, p, e, u, 0.85, 0.85) == "torch"
    assert calls == ["update_reference_"]


def test_an_empty_update_is_a_no_op():
    assert importance.update_(registry.load("torch"), [], [], [], [], 0.85, 0.85) == "torch"
