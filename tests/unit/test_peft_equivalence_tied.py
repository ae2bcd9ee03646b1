"""On the same weights, our lora equals PEFT's LoRA and our vera equals PEFT's VeRA.

Logits and every adapter gradient agree within 1e-5 (fp32), on a small randomly
initialised Llama (with GQA, so the VeRA slicing is exercised) and on a BERT.
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkern  # noqa: E402
from tests.helpers.models import tiny_model, tokens  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def _peft_module(peft_model, path):
    return peft_model.base_model.model.get_submodule(path)


def _run(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach()


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_lora_equals_peft_lora(family, backend):
    base = tiny_model(family)
    ours = peftkern.patch(copy.deepcopy(base), "lora", rank=4, alpha=8, targets=TARGETS[family], backend=backend)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                       target_modules=TARGETS[family]))
    state = ours.peftkern
    with torch.no_grad():
        for slot in state.plan.slots:
            g = state.groups[slot.index]
            g.B.normal_()  # B = 0 at init would make the comparison trivial
            m = _peft_module(theirs, slot.path)
            m.lora_A["default"].weight.copy_(g.A)
            m.lora_B["default"].weight.copy_(g.B)
    ids = tokens()
    torch.testing.assert_close(_run(ours, ids), _run(theirs, ids), **TOL)
    for slot in state.plan.slots:
        g, m = state.groups[slot.index], _peft_module(theirs, slot.path)
        torch.testing.assert_close(g.A.grad, m.lora_A["default"].weight.grad, **TOL)
        torch.testing.assert_close(g.B.grad, m.lora_B["default"].weight.grad, **TOL)


def test_lora_init_follows_peft():
    """A is Kaiming-uniform with PEFT's bound 1/sqrt(fan_in); B starts at zero."""
    model = peftkern.patch(tiny_model("llama"), "lora", rank=4, backend="torch")
    for g in model.peftkern.groups:
        assert torch.all(g.B == 0)
        bound = g.A.shape[1] ** -0.5
        assert g.A.abs().max() <= bound and g.A.abs().max() > 0.5 * bound


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_vera_equals_peft_vera(family):
    base = tiny_model(family)
    ours = peftkern.patch(copy.deepcopy(base), "vera", rank=4, targets=TARGETS[family])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=TARGETS[family],
                                                                       projection_prng_key=0, vera_dropout=0.0))
    state = ours.peftkern
    first = _peft_module(theirs, state.plan.slots[0].path)
    # Same seed, same draw: the frozen shared projections are identical without copying.
    assert torch.equal(state.A, first.vera_A["default"]) and torch.equal(state.B, first.vera_B["default"])
    with torch.no_grad():
        for slot in state.plan.slots:
            g, m = state.groups[slot.index], _peft_module(theirs, slot.path)
            assert torch.equal(g.u, m.vera_lambda_d["default"])  # d_initial = 0.1 in both
            g.v.normal_()  # v = 0 at init would make the comparison trivial
            m.vera_lambda_b["default"].copy_(g.v)
    ids = tokens()
    torch.testing.assert_close(_run(ours, ids), _run(theirs, ids), **TOL)
    for slot in state.plan.slots:
        g, m = state.groups[slot.index], _peft_module(theirs, slot.path)
        torch.testing.assert_close(g.u.grad, m.vera_lambda_d["default"].grad, **TOL)
        torch.testing.assert_close(g.v.grad, m.vera_lambda_b["default"].grad, **TOL)
