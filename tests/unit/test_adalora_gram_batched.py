"""The batched orthogonality distances (the torch path: CUDA, or no extension) against the
per-matrix reference: values and fp64 gradients, with shapes interleaved as q_proj's and
v_proj's are in a model, so that the regrouping and the restored order are both exercised."""
import torch

from peftkern.ops import importance, registry


def _mats(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    shapes_p = [(12, 3), (5, 3), (12, 3), (5, 3), (7, 3)]  # P: [n, r], one odd one out
    shapes_q = [(3, 9), (3, 4), (3, 9), (3, 4), (3, 9)]  # Q: [r, k]
    cols = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes_p]
    rows = [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes_q]
    return cols, rows


def test_batched_distances_match_the_reference_in_order():
    cols, rows = _mats()
    got = importance.gram_distances_batched(cols, rows)
    want = importance.gram_distances_reference(cols, rows)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.arange(1.0, len(want) + 1, dtype=want.dtype)  # order-sensitive
    g_got = torch.autograd.grad((got * weights).sum(), cols + rows)
    g_want = torch.autograd.grad((want * weights).sum(), cols + rows)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batched_distances_gradcheck():
    cols, rows = _mats()
    n = len(cols)
    assert torch.autograd.gradcheck(lambda *m: importance.gram_distances_batched(m[:n], m[n:]), cols + rows)


def test_torch_path_runs_the_batched_distances():
    cols, rows = _mats(torch.float32)
    d, path = importance.gram_distances(registry.load("torch"), cols, rows)
    assert path == "torch" and d.shape == (len(cols) + len(rows),)
