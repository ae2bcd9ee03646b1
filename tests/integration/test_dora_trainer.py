"""DoRA under transformers' Trainer with its default optimizer (``adamw_torch_fused``, also TRL's and
so ``peftkern finetune --task sft``'s), which updates parameters without bumping their version
counters: after training, the model's cached norms and g equal those of a fresh copy (no cache)."""
import copy

import torch
import transformers

import peftkern
from tests.helpers.models import tiny_model, tokens


class _Data(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return 8

    def __getitem__(self, i):
        row = self.ids[i % len(self.ids)]
        return {"input_ids": row, "labels": row}


def test_dora_trained_by_the_default_trainer_optimizer_matches_a_fresh_copy(tmp_path):
    torch.manual_seed(0)
    model = peftkern.patch(tiny_model("llama"), "lora", rank=4, targets=["q_proj", "k_proj", "v_proj"],
                           use_dora=True).train()
    ids = tokens()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                                          learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True)
    assert "fused" in str(args.optim).lower()  # the default this guards
    before = {n: p.detach().clone() for n, p in model.peftkern.named_parameters()}
    transformers.Trainer(model=model, args=args, train_dataset=_Data(ids)).train()
    assert any(not torch.equal(before[n], p) for n, p in model.peftkern.named_parameters())  # it trained
    fresh = copy.deepcopy(model)
    torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
