"""Patched models train under transformers.Trainer (lora; adalora with its callback when registered)."""
import copy

import pytest
import torch
import transformers as T
from datasets import Dataset

import peftkern
from tests.helpers.models import VOCAB, tiny_model


def dataset(n=16, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()  # learnable from the first token
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()})


def trainer_for(model, tmp_path, steps=4, callbacks=()):
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                               learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01,
                               logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                               seed=0)
    return T.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks))


def _values(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(b, p) for b, p in zip(before, params)]


def test_trainer_trains_lora_and_the_head_only(tmp_path):
    base = tiny_model("bert", "cls")
    model = peftkern.patch(copy.deepcopy(base), "lora", rank=4)
    adapter = [p for p in model.peftkern.parameters() if p.requires_grad]
    head = list(model.classifier.parameters())
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    before = _values(adapter), _values(head), _values(frozen)
    trainer = trainer_for(model, tmp_path)
    result = trainer.train()
    assert result.global_step == 4 and result.training_loss == result.training_loss
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(x == x for x in losses)
    assert all(_changed(before[0], adapter)) and all(_changed(before[1], head))
    assert not any(_changed(before[2], frozen)), "the base model must stay frozen"
    # what Trainer trained is what save/load keeps
    peftkern.save(trainer.model, tmp_path / "adapter")
    reloaded = peftkern.load(copy.deepcopy(base), tmp_path / "adapter").eval()
    ids = torch.tensor(dataset()["input_ids"][:4])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.skipif("adalora" not in peftkern.methods(), reason="adalora is not registered")
def test_trainer_runs_adalora_allocation(tmp_path):
    model = peftkern.patch(tiny_model("bert", "cls"), "adalora", rank=2, total_step=6, tinit=1, tfinal=2, deltaT=1)
    state = model.peftkern
    full = [state.effective_rank(s.index) for s in state.plan.slots]
    trainer = trainer_for(model, tmp_path, steps=6, callbacks=[peftkern.AllocatorCallback()])
    trainer.train()
    kept = [state.effective_rank(s.index) for s in state.plan.slots]
    assert trainer.state.global_step == 6
    assert sum(kept) < sum(full), f"allocation should have pruned under Trainer: {full} -> {kept}"
