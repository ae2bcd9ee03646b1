"""Gradient checkpointing gives every method the gradients it gives without it, in both of torch's
modes (transformers' ``gradient_checkpointing_enable``, reentrant or not).

HyperAdaLoRA used to keep its own generation cache, which recomputation did not know: the
non-reentrant mode raised "A different number of tensors was saved during the original forward
and recomputation", the reentrant one "Trying to backward through the graph a second time".
Every generating method now uses one cache (hypernets/pass_cache.py)."""
import copy

import pytest
import torch

import peftkern
from tests.helpers.models import tiny_model, tokens

METHODS = [("lora", {}), ("tied_lora", {}), ("tied_lora", {"joint": True}), ("vera", {}), ("pg_fixed", {}),
           ("pg_trainable", {}), ("pg_pos", {"generate": "AB"}), ("adalora", {"total_step": 10}),
           ("hyper_adalora", {"total_step": 10}), ("hyper_adalora", {"total_step": 10, "hypernet": "mlp"}),
           ("hyper_adalora", {"total_step": 10, "hypernet": "cnn"}),
           ("hyper_adalora", {"total_step": 10, "state_update": "advance"})]
IDS = [m + "".join(f"-{k}={v}" for k, v in o.items() if k != "total_step") for m, o in METHODS]


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("method,options", METHODS, ids=IDS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_gradients_equal_plain_ones(method, options, reentrant):
    plain = peftkern.patch(tiny_model("llama"), method, rank=2, backend="torch", **options).train()
    with torch.no_grad():  # B = 0 or Λ = 0 at init would make A's gradient trivially zero in both
        for p in plain.peftkern.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # reentrant checkpointing needs an input that requires grad (PEFT does the same)
        checkpointed.enable_input_require_grads()
    ids = tokens()
    want, got = _grads(plain, ids), _grads(checkpointed, ids)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
