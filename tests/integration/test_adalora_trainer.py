"""adalora and hyper_adalora under transformers.Trainer with peftkern.AllocatorCallback: total_step
from max_steps, one allocation per optimizer step with gradient accumulation, the schedule's final
budget met, and the step counter following TrainerState.global_step (resume)."""
import types

import pytest
import torch
import transformers as T
from datasets import Dataset

import peftkern
from tests.helpers.models import VOCAB, tiny_model

STEPS = 6


def _dataset(n=24, seq=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > VOCAB // 2).long().tolist()})


def _trainer(model, tmp_path, accumulation):
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
                               gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=1,
                               save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return T.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[peftkern.AllocatorCallback()])


@pytest.mark.parametrize("method", ["adalora", "hyper_adalora"])
def test_trainer_allocates_once_per_optimizer_step(tmp_path, method):
    model = peftkern.patch(tiny_model("bert", "cls"), method, rank=2, total_step="auto", tinit=1, tfinal=2)
    state = model.peftkern
    calls = []
    original = state.allocator.allocate
    state.allocator.allocate = lambda step, *a: (calls.append(step), original(step, *a))
    _trainer(model, tmp_path, accumulation=2).train()
    assert state.allocator.schedule.total_step == STEPS  # filled from max_steps
    assert calls == list(range(STEPS))  # 12 micro-batches, 6 optimizer steps, 6 allocations
    assert state.allocator.global_step == STEPS
    # total_step - tfinal = 4 forced the final pattern: target_r on average
    assert int(state.allocator.keep.sum()) == 2 * len(state.plan.slots)


def test_callback_follows_trainer_global_step_and_warns_on_a_mismatch():
    model = peftkern.patch(tiny_model("bert", "cls"), "adalora", rank=2, total_step=10)
    cb = peftkern.AllocatorCallback()
    trainer_state = types.SimpleNamespace(global_step=7, max_steps=12)
    with pytest.warns(RuntimeWarning, match="max_steps=12"):
        cb.on_train_begin(None, trainer_state, None, model=model, optimizer=torch.optim.SGD(
            model.peftkern.parameters(), lr=0.1))
    assert model.peftkern.allocator.global_step == 7  # resumed at step 7
    trainer_state.global_step = 8
    cb.on_pre_optimizer_step(None, trainer_state, None)
    assert model.peftkern.allocator.global_step == 8
    assert model.peftkern.allocator.schedule.total_step == 10  # a given total_step is kept


def test_callback_refuses_a_method_without_allocator():
    model = peftkern.patch(tiny_model("bert", "cls"), "lora", rank=2)
    with pytest.raises(ValueError, match="allocate ranks .adalora, hyper_adalora"):
        peftkern.AllocatorCallback().on_train_begin(None, types.SimpleNamespace(global_step=0, max_steps=3), None,
                                                    model=model)


def test_callback_allocates_itself_for_an_optimizer_without_torch_hooks():
    model = peftkern.patch(tiny_model("bert", "cls"), "adalora", rank=2, total_step=5)
    state = model.peftkern
    cb = peftkern.AllocatorCallback()
    trainer_state = types.SimpleNamespace(global_step=0, max_steps=5)
    cb.on_train_begin(None, trainer_state, None, model=model, optimizer=object())  # not a torch Optimizer
    ids = torch.randint(1, VOCAB, (2, 6))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    cb.on_pre_optimizer_step(None, trainer_state, None)
    cb.on_optimizer_step(None, trainer_state, None)
    cb.on_optimizer_step(None, trainer_state, None)  # a second call for the same step does nothing
    assert state.allocator.global_step == 1


# (method options, checkpoint step to resume from): schedules that prune unevenly and in steps, from every
# checkpoint; the first row is the one configuration the resume test used to cover
RESUME = [({"rank": 2, "tinit": 1, "tfinal": 1}, 2), ({"rank": 2, "tinit": 1, "tfinal": 1}, 3),
          ({}, 2), ({}, 3), ({"rank": 2, "tinit": 0, "tfinal": 2, "deltaT": 2}, 4),
          ({"rank": 3, "init_r": 6, "tinit": 1, "tfinal": 0, "deltaT": 1}, 3)]


def _resume_trainer(model, out, save_steps, callback):
    args = T.TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=2e-2,
                               save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True,
                               disable_tqdm=True, seed=0, logging_steps=100)
    return T.Trainer(model=model, args=args, train_dataset=_causal_dataset(),
                     callbacks=[peftkern.AllocatorCallback()] if callback else [])


def _causal_dataset(n=24, seq=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _patched(options, total_step):
    options = dict(options)
    rank = options.pop("rank", None)
    return peftkern.patch(tiny_model("llama"), "adalora", rank=rank, total_step=total_step, **options)


@pytest.mark.parametrize("callback", [True, False], ids=["callback", "no-callback"])
@pytest.mark.parametrize("options,resume_at", RESUME, ids=[f"{o}-from-{s}" for o, s in RESUME])
def test_a_resumed_run_ends_where_the_straight_run_ends(tmp_path, options, resume_at, callback):
    """Exact resume for any schedule and checkpoint (the native files keep pruned components: their
    P and Q keep training and resumed runs diverged by up to 0.088 when a save dropped them)."""
    total = "auto" if callback else STEPS
    straight = _patched(options, total)
    _resume_trainer(straight, tmp_path / "a", resume_at, callback).train()
    resumed = _patched(options, total)
    _resume_trainer(resumed, tmp_path / "b", resume_at, callback).train(
        resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{resume_at}"))
    assert peftkern.rank_pattern(resumed) == peftkern.rank_pattern(straight)
    assert resumed.peftkern.allocator.global_step == straight.peftkern.allocator.global_step == STEPS
    for (name, a), (_, b) in zip(straight.peftkern.named_parameters(), resumed.peftkern.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["adalora", "hyper_adalora"])
def test_the_orthogonality_term_counts_once_per_step_under_gradient_accumulation(tmp_path, method):
    """A causal LM takes loss kwargs: the Trainer passes num_items_in_batch and sums the micro-batches'
    losses without dividing by their number, so the term added to each counted twice at
    gradient_accumulation_steps=2 (as orth_reg_weight doubled: a review's finding). 4 × 2 accumulated
    now trains as a batch of 8 (plain SGD, so that Adam's normalisation does not magnify rounding)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (32, 8), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trained = {}
    for batch, accumulation, weight in [(8, 1, 0.5), (4, 2, 0.5), (8, 1, 1.0)]:
        model = peftkern.patch(tiny_model("llama"), method, rank=2, total_step=4, tinit=1, tfinal=1,
                               orth_reg_weight=weight)
        args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
                                   save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        trainer = T.Trainer(model=model, args=args, train_dataset=data, callbacks=[peftkern.AllocatorCallback()])
        assert trainer.model_accepts_loss_kwargs  # the case: num_items_in_batch reaches the forward
        trainer.train()
        trained[batch, accumulation, weight] = {n: p.detach().clone() for n, p in model.peftkern.named_parameters()}
    once, accumulated, doubled = trained.values()
    for name in once:
        torch.testing.assert_close(accumulated[name], once[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.allclose(doubled[n], once[n], rtol=1e-4, atol=1e-6) for n in once)  # the term matters
