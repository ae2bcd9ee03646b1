"""AdaLoRA's orthogonality regulariser: the compiled distances give the reference's value and
gradients in both forms, and explain() names the path that ran."""
import os

import pytest
import torch

import peftkern
from peftkern.methods.svd import orthogonality
from tests.helpers.models import tiny_model, tokens

SCHEDULE = dict(tinit=0, tfinal=0, deltaT=1, total_step=10)
BACKENDS = ["torch"] + ([] if os.environ.get("PEFTKERN_NO_EXT") == "1" else ["cpp"])


def _state(backend, form):
    model = peftkern.patch(tiny_model("llama"), "adalora", rank=2, backend=backend, orth_form=form, **SCHEDULE)
    state = model.peftkern
    with torch.no_grad():  # away from PEFT's near-zero init, so that the gradients are not tiny
        for p in list(state.P) + list(state.Q):
            p.add_(torch.randn_like(p) * 0.3)
    return model, state


@pytest.mark.parametrize("form", ["peft", "squared"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_regularization_matches_the_gram_reference(backend, form):
    _, state = _state(backend, form)
    params = list(state.P) + list(state.Q)
    reg = state.regularization()
    grams = [p.t() @ p for p in state.P] + [q @ q.t() for q in state.Q]
    want = state.orth_reg_weight * orthogonality(grams, len(state.P), form)
    torch.testing.assert_close(reg, want, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad(reg, params)
    want_grads = torch.autograd.grad(want, params)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert state.orthogonality_path == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_names_the_orthogonality_path(backend):
    model, _ = _state(backend, "peft")
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()  # the loss hook runs the regulariser
    rows = peftkern.explain(model).rows
    assert all(row["orthogonality"] == backend for row in rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_step_under_bf16_autocast_on_an_fp32_model(backend):
    """HF Trainer's bf16=True and the CLI's --precision bf16 on the CPU: the regulariser's Gram products
    run in the factors' fp32, outside autocast (the compiled kernels refused the bf16 products: a
    review's finding), and equal the regulariser outside autocast."""
    model, state = _state(backend, "peft")
    ids = tokens()
    want = state.regularization().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        reg = state.regularization()
    assert reg.dtype == torch.float32
    torch.testing.assert_close(reg.detach(), want, rtol=0, atol=0)
    (loss + reg).backward()
    assert all(p.grad is not None for p in state.P)


def test_hyper_adaloras_regulariser_under_autocast_is_its_fp32_value():
    """HyperAdaLoRA's Gram products too run outside autocast (they came back in bf16: 2.281 for 2.293,
    a review's finding)."""
    model = peftkern.patch(tiny_model("llama"), "hyper_adalora", rank=2, backend="torch", **SCHEDULE)
    state = model.peftkern
    want = state.regularization().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = state.regularization()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=0)


def test_with_num_items_in_batch_the_term_comes_once_per_accumulation_window():
    """Where the caller passes num_items_in_batch (the Trainer, TRL's compute_loss) the micro-batches' losses
    are summed undivided: the term comes with the first loss of each window only (the adapter holding no
    gradient yet, or an optimizer step since), from the model's loss (the forward hook) and from
    orthogonal_regularization alike; without it, with every loss. A window cut short by a skipped step
    (zero_grad without a step: GradScaler's overflow) or a resume starts a new one (a review's finding)."""
    model, state = _state("torch", "peft")
    ids = tokens(batch=2, seq=5)
    plain = model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(plain[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    reg = state.regularization().detach()
    items = torch.tensor(ids[:, 1:].numel())

    def micro_batch():
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=items).loss
        loss.backward()
        return loss.detach()

    losses = [micro_batch(), micro_batch()]
    torch.testing.assert_close(losses[0], ce.detach() / items + reg)
    torch.testing.assert_close(losses[1], ce.detach() / items)  # the window's second micro-batch
    assert peftkern.orthogonal_regularization(model, items) is None  # the same window
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids, num_items_in_batch=items).loss > losses[1]  # evaluation: always
    model.zero_grad()  # a step skipped (no optimizer step): the next window still takes the term
    torch.testing.assert_close(micro_batch(), losses[0])
    torch.testing.assert_close(micro_batch(), losses[1])
    torch.optim.SGD(state.parameters(), lr=0.0).step()  # a step without zero_grad(set_to_none): a new window
    torch.testing.assert_close(peftkern.orthogonal_regularization(model, items), reg)
    assert peftkern.orthogonal_regularization(model, items) is None
    torch.testing.assert_close(peftkern.orthogonal_regularization(model), reg)  # a loop dividing by itself


def test_under_data_parallelism_the_term_is_the_processs_share():
    """The Trainer multiplies a loss normalised by num_items_in_batch by its process count before DDP averages
    the gradients, so the term the model adds counted once per process (a review's finding, 2-process gloo
    run): each process's loss carries 1/world size of it; AllocatorCallback reads the Trainer's setting."""
    import types

    from peftkern.methods.allocator import regularization_share

    model, state = _state("torch", "peft")
    assert regularization_share(state) == 1.0  # not distributed
    callback = peftkern.AllocatorCallback()
    args = types.SimpleNamespace(world_size=4, average_tokens_across_devices=True)
    callback.on_train_begin(args, types.SimpleNamespace(global_step=0, max_steps=10), None, model=model)
    assert regularization_share(state) == 0.25
    ids = tokens(batch=2, seq=5)
    items = torch.tensor(ids[:, 1:].numel())
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss - state.regularization()  # the cross-entropy
    first = model(input_ids=ids, labels=ids, num_items_in_batch=items).loss
    torch.testing.assert_close(first.detach(), plain + 0.25 * state.regularization().detach())
    args.average_tokens_across_devices = False  # then the Trainer does not multiply, and DDP's mean keeps it whole
    callback.on_train_begin(args, types.SimpleNamespace(global_step=0, max_steps=10), None, model=model)
    assert regularization_share(state) == 1.0


def test_a_whole_model_checkpointed_recomputes_the_same_term():
    """Non-reentrant checkpointing of the whole model runs its root forward hook again inside the backward:
    with zero_grad(set_to_none=False) the recomputation saw the window's term taken and left it out, and
    the checkpoint failed on a different graph (a review's finding). It repeats the forward's decision."""
    from torch.utils.checkpoint import checkpoint

    model, state = _state("torch", "peft")
    ids = tokens(batch=2, seq=5)
    items = torch.tensor(ids[:, 1:].numel())
    losses = []
    for _ in range(2):  # a window of two micro-batches, then a zeroed (not None) gradient
        for _ in range(2):
            loss = checkpoint(lambda x: model(input_ids=x, labels=x, num_items_in_batch=items).loss, ids,
                              use_reentrant=False)
            loss.backward()
            losses.append(loss.detach())
        torch.optim.SGD(state.parameters(), lr=0.0).step()
        model.zero_grad(set_to_none=False)
    torch.testing.assert_close(losses[0] - losses[1], state.regularization().detach())
    torch.testing.assert_close(losses[2:], losses[:2])
