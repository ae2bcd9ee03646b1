"""peftkern.disable_adapter: PEFT's ``with model.disable_adapter():`` (a DPO reference pass)."""
import pytest
import torch

import peftkern
from tests.helpers.models import tiny_model, tokens


def _trained(method, **kw):
    base = tiny_model("llama")
    expected = base(input_ids=tokens()).logits
    model = peftkern.patch(base, method, rank=2, backend="torch", **kw)
    with torch.no_grad():  # ΔW ≠ 0 (lora and adalora start at ΔW = 0)
        for p in model.peftkern.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model, expected


@pytest.mark.parametrize("method,kw", [("lora", {}), ("pg_pos", {}), ("adalora", {"total_step": 10})])
def test_inside_the_block_the_model_is_its_base(method, kw):
    model, base_logits = _trained(method, **kw)
    ids = tokens()
    adapted = model(input_ids=ids, labels=ids)
    assert not torch.allclose(adapted.logits, base_logits)
    with peftkern.disable_adapter(model) as m:
        assert m is model
        out = model(input_ids=ids, labels=ids)
        torch.testing.assert_close(out.logits, base_logits)
        with peftkern.disable_adapter(model):  # nests
            pass
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
    again = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(again.logits, adapted.logits)
    torch.testing.assert_close(again.loss, adapted.loss)  # AdaLoRA's regulariser is added again


def test_adalora_regulariser_is_not_added_while_disabled():
    model, _ = _trained("adalora", total_step=10)
    ids = tokens()
    with peftkern.disable_adapter(model):
        plain = model(input_ids=ids, labels=ids).loss
        task = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1),
                                                 ids[:, 1:].flatten())
    torch.testing.assert_close(plain, task)


def test_the_state_comes_back_after_an_exception_and_merged_models_are_refused():
    model, _ = _trained("lora")
    with pytest.raises(RuntimeError, match="boom"):
        with peftkern.disable_adapter(model):
            raise RuntimeError("boom")
    assert model.peftkern.disabled is False
    peftkern.merge(model)
    with pytest.raises(ValueError, match=r"merged.*peftkern\.unmerge\(model\) first"):
        with peftkern.disable_adapter(model):
            pass
    with pytest.raises(ValueError, match="not patched"):
        with peftkern.disable_adapter(tiny_model("llama")):
            pass
