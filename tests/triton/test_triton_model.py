"""End to end: patch(..., backend="triton") on tiny transformers runs forward and backward
on the CPU under the Triton interpreter and agrees with backend="torch"."""
import pytest
import torch

pytest.importorskip("triton")
import peftkern  # noqa: E402
from peftkern.ops.backends import triton as tk  # noqa: E402
from tests.helpers.models import tiny_model, tokens  # noqa: E402

CASES = [
    ("llama", "lora", {}),
    ("gpt2", "lora", {}),  # Conv1D: the base weight reaches the kernels as a transposed view
    ("llama", "tied_lora", {"targets": ["q_proj", "k_proj", "v_proj"], "joint": True, "tie": "AB",
                            "train": "ABuv"}),
]


def _patched(family, method, kw, backend):
    model = peftkern.patch(tiny_model(family), method, rank=4, backend=backend, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every factor off its init (LoRA's B = 0) the same way for both
        for p in model.peftkern.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family,method,kw", CASES)
def test_triton_model_matches_torch_backend(family, method, kw):
    ids = tokens()
    results = {}
    for backend in ("torch", "triton"):
        model = _patched(family, method, kw, backend)
        tk.reset_launch_counts()
        out = model(ids, labels=ids)
        if backend == "triton" and kw.get("joint"):  # one shared shrink per layer, one expand per target
            layers = model.config.num_hidden_layers
            assert tk.launch_counts() == {"shrink": layers, "lowrank_gemm": 3 * layers}
        out.loss.backward()
        grads = {n: p.grad for n, p in model.peftkern.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        results[backend] = (out.logits.detach(), grads)
    logits_t, grads_t = results["torch"]
    logits_k, grads_k = results["triton"]
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-4)
    assert grads_k.keys() == grads_t.keys()
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-5, msg=name)


def test_explain_reports_triton():
    model = peftkern.patch(tiny_model("llama"), "lora", rank=4, backend="triton")
    exp = peftkern.explain(model)
    assert exp.rows and all(row["backend"] == "triton" and row["requested"] == "triton" for row in exp.rows)
    assert exp.backends["triton"] is None  # loads: no recorded failure


@pytest.mark.parametrize("kw,hypernets", [({}, 1), ({"generate": "AB"}, 2), ({"layers_per_hypernet": 1}, 3)])
def test_pg_generates_every_layer_in_one_launch_per_hypernet(kw, hypernets):
    """The design card's promise: one hypernet kernel launch per hypernetwork per forward (and
    one per backward), however many layers and targets it generates for, and the launches
    agree with the torch backend."""
    ids = tokens()
    model = peftkern.patch(tiny_model("llama"), "pg_pos", rank=4, backend="triton", **kw)
    with torch.no_grad():  # off the init (B_L = 0), so that every gradient is non-trivial
        g = torch.Generator().manual_seed(5)
        for p in model.peftkern.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ref = peftkern.patch(tiny_model("llama"), "pg_pos", rank=4, backend="torch", **kw)
    ref.load_state_dict(model.state_dict())
    assert model.config.num_hidden_layers == 3 and hypernets <= 3  # so that the counts below mean something
    tk.reset_launch_counts()
    out = model(ids, labels=ids)
    assert tk.launch_counts()["hypernet_fwd"] == hypernets
    tk.reset_launch_counts()
    out.loss.backward()
    assert tk.launch_counts()["hypernet_bwd"] == hypernets
    want = ref(ids, labels=ids)
    want.loss.backward()
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.peftkern.named_parameters(), ref.peftkern.parameters()):
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
