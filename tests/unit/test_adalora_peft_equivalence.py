"""adalora equals PEFT 0.21's AdaLoRA: logits, the loss with the orthogonality term, Λ after every
allocation step and the final rank pattern, through real training steps of a tiny Llama and a BERT.

Both start from the same P, Λ, Q (copied into PEFT's lora_B, lora_E, lora_A) and train with the
same AdamW on the same batches. Ours allocates by itself (optimizer-step hook); PEFT is driven by
hand the way its docs say: ``update_and_allocate(step)`` after ``optimizer.step()``, before
``zero_grad()``. The schedule (tinit=2, tfinal=3, deltaT=2, total_step=12) covers the warm-up,
several masking steps of the cubic budget, the forced final mask and the final fine-tuning.
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkern  # noqa: E402
from tests.helpers.models import tiny_model, tokens  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
SCHEDULE = dict(tinit=2, tfinal=3, deltaT=2, total_step=12)
STEPS = 12
TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(family, backend):
    base = tiny_model(family)
    ours = peftkern.patch(copy.deepcopy(base), "adalora", rank=4, targets=TARGETS[family], backend=backend,
                          **SCHEDULE)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[family],
                             **SCHEDULE)
    # AdaLoraModel itself: its forward adds the orthogonality term (a bare PeftModel without a
    # task_type would bypass it and return the task loss only).
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).base_model
    state = ours.peftkern
    with torch.no_grad():
        state.lam.normal_(0, 0.5)  # Λ = 0 at init (both) would make the first logits trivial
        for slot in state.plan.slots:
            m = theirs.model.get_submodule(slot.path)
            m.lora_A["default"].copy_(state.Q[slot.index])
            m.lora_B["default"].copy_(state.P[slot.index])
            m.lora_E["default"].copy_(state.lam[slot.index].unsqueeze(1))
    return ours, theirs


def _peft_lam(theirs, state):
    return torch.stack([theirs.model.get_submodule(s.path).lora_E["default"].detach().view(-1)
                        for s in state.plan.slots])


@pytest.mark.parametrize("family,backend", [("llama", "auto"), ("llama", "torch"), ("bert", "auto")])
def test_adalora_trains_like_peft(family, backend):
    ours, theirs = _pair(family, backend)
    state = ours.peftkern
    assert state.plan.rank == 6 and state.plan.options.target_r == 4  # init_r = round(1.5 * 4)
    opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    # Both stay in eval mode: BERT's dropout would draw different random masks in the two models,
    # and nothing in AdaLoRA depends on the training flag.
    masked_steps = 0
    for step in range(STEPS):
        ids = tokens(batch=2, seq=9, seed=step)
        out_a, out_b = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
        torch.testing.assert_close(out_a.logits, out_b.logits, **TOL)
        torch.testing.assert_close(out_a.loss, out_b.loss, **TOL)  # includes 0.5 * orthogonality in both
        out_a.loss.backward()
        out_b.loss.backward()
        opt_a.step()  # ours allocates here, through the optimizer-step hook
        opt_b.step()
        theirs.update_and_allocate(step)
        opt_a.zero_grad()
        opt_b.zero_grad()
        lam_b = _peft_lam(theirs, state)
        assert torch.equal(state.lam == 0, lam_b == 0), f"step {step}: a different Λ entry was masked"
        torch.testing.assert_close(state.lam.detach(), lam_b, **TOL)
        masked_steps += int((lam_b == 0).any())
    assert state.allocator.global_step == STEPS
    assert masked_steps >= 5  # the schedule really masked on several steps
    pattern = theirs.peft_config["default"].rank_pattern
    theirs_by_path = {k.rsplit(".lora_E", 1)[0]: v for k, v in pattern.items()}
    assert state.rank_pattern() == theirs_by_path
    # the final budget is met exactly: target_r on average
    assert sum(map(sum, theirs_by_path.values())) == 4 * len(state.plan.slots)


def test_orthogonality_term_equals_peft_on_the_loss():
    ours, theirs = _pair("llama", "torch")
    ids = tokens()
    state = ours.peftkern
    reg = peftkern.orthogonal_regularization(ours)
    assert reg is not None and reg.requires_grad and float(reg.detach()) > 0
    out = ours(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, theirs(input_ids=ids, labels=ids).loss, **TOL)
    # the hook added exactly state.regularization() to the model's own task loss
    v = out.logits.shape[-1]
    task = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + reg, **TOL)
    assert state.orth_form == "peft" and state.orth_reg_weight == 0.5


def test_scale_is_peft_alpha_over_ranknum_plus_eps():
    model = peftkern.patch(tiny_model("llama"), "adalora", rank=8, total_step=10)
    state = model.peftkern
    assert state.plan.rank == 12 and state.plan.options.target_r == 8  # PEFT's defaults for rank 8
    assert state.scale == 8.0 / (12 + 1e-5)
    assert torch.all(state.lam == 0)
    for p in list(state.P) + list(state.Q):
        assert abs(float(p.std()) - 0.02) < 0.006
