"""torch.export of a patched model (non-strict, its default) leaves the live model as it was: the same
outputs, and gradients on its real parameters. The export swaps each module's name -> parameter dict
for one of fake tensors while it traces; the adapter once kept those dicts for its lookups, and then
ran the fakes after an export (wrong outputs on the torch backend, nothing trained, errors elsewhere)."""
import pytest
import torch

import peftkern
from tests.helpers.adapters import perturb
from tests.helpers.models import tiny_model, tokens


@pytest.mark.parametrize("method,extra", [("lora", {}), ("lora", {"use_dora": True}), ("vera", {}),
                                          ("tied_lora", {}), ("pg_pos", {}),
                                          ("adalora", {"total_step": 10})])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_an_export_leaves_the_live_model_intact(method, extra, backend):
    model = peftkern.patch(tiny_model("llama"), method, rank=4, backend=backend, **extra).eval()
    perturb(model)
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    program = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
    torch.testing.assert_close(program.module()(input_ids=ids, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
    assert all(type(p) is torch.nn.Parameter for p in model.peftkern.parameters())
    model.train()
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)  # dropout is 0
    logits.sum().backward()
    trained = [n for n, p in model.peftkern.named_parameters() if p.requires_grad]
    assert trained and all(model.peftkern.get_parameter(n).grad is not None for n in trained)
