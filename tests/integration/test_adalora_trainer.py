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
