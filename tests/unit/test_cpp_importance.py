"""The compiled AdaLoRA importance update: bit for bit the reference (and so PEFT), in place.

AdaLoRA prunes by thresholding these scores, so a one-ulp difference can change which
rank component is dropped: the checks here are torch.equal, never allclose.
"""
import os

import pytest
import torch

from peftkern.ops import importance, registry

if os.environ.get("PEFTKERN_NO_EXT") == "1":
    pytest.skip("installed with PEFTKERN_NO_EXT=1: no C++ extension", allow_module_level=True)

from peftkern.ops.backends import cpp as cb  # noqa: E402

# Odd sizes, a 0-d-like single element, an empty tensor, and one large enough to be split
# across threads (the op parallelises over one flat index space of all tensors).
SHAPES = [(8, 123), (45, 8), (8, 1), (1,), (0, 4), (300, 257)]


def _state(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        # Mixed magnitudes, including tiny products that land in the denormal range.
        p = torch.randn(shape, generator=g) * torch.logspace(-20, 2, 7)[torch.randint(0, 7, shape, generator=g)]
        grad = torch.randn(shape, generator=g) * torch.logspace(-20, 1, 5)[torch.randint(0, 5, shape, generator=g)]
        out.append((p.to(dtype), grad.to(dtype)))
    return out


def _run(update, dtype, beta1, beta2, steps=4):
    torch.manual_seed(0)
    e = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    u = [torch.zeros(s, dtype=dtype) for s in SHAPES]
    for step in range(steps):
        pg = _state(dtype, seed=step)
        update([p for p, _ in pg], [g for _, g in pg], e, u, beta1, beta2)
    return e, u


@pytest.mark.parametrize("beta1,beta2", [(0.85, 0.85), (0.9, 0.999), (0.1, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_update_is_bit_exact(dtype, beta1, beta2):
    e_ref, u_ref = _run(importance.update_reference_, dtype, beta1, beta2)
    e_cpp, u_cpp = _run(cb.update_importance_, dtype, beta1, beta2)
    for i, (a, b, c, d) in enumerate(zip(e_cpp, e_ref, u_cpp, u_ref)):
        assert torch.equal(a, b), f"exp_avg_ipt[{i}] differs in {(a != b).sum()} elements"
        assert torch.equal(c, d), f"exp_avg_unc[{i}] differs in {(c != d).sum()} elements"
    assert any(t.abs().sum() > 0 for t in u_ref)  # the scores actually moved


def test_importance_update_dispatches_to_cpp():
    pg = _state(torch.float32, seed=3)
    e = [torch.zeros(s) for s in SHAPES]
    u = [torch.zeros(s) for s in SHAPES]
    cpp = registry.load("cpp")
    assert importance.update_(cpp, [p for p, _ in pg], [g for _, g in pg], e, u, 0.85, 0.85) == "cpp"
    e2 = [torch.zeros(s) for s in SHAPES]
    u2 = [torch.zeros(s) for s in SHAPES]
    importance.update_reference_([p for p, _ in pg], [g for _, g in pg], e2, u2, 0.85, 0.85)
    assert all(torch.equal(a, b) for a, b in zip(e + u, e2 + u2))


def test_bad_input_raises_before_modifying_anything():
    p = [torch.randn(3, 4), torch.randn(5)]
    g = [torch.randn(3, 4), torch.randn(6)]  # second grad has the wrong shape
    e = [torch.ones(3, 4), torch.ones(5)]
    u = [torch.ones(3, 4), torch.ones(5)]
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        cb.update_importance_(p, g, e, u, 0.85, 0.85)
    assert all(torch.equal(t, torch.ones_like(t)) for t in e + u)
    with pytest.raises(ValueError, match="same length"):
        cb.update_importance_(p, g[:1], e, u, 0.85, 0.85)
    with pytest.raises(TypeError, match="dtype"):
        cb.update_importance_([p[0]], [g[0].double()], [e[0]], [u[0]], 0.85, 0.85)
    with pytest.raises(ValueError, match="contiguous"):
        cb.update_importance_([p[0].t()], [g[0].t()], [e[0].t()], [u[0].t()], 0.85, 0.85)
