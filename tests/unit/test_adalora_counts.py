"""adalora's trainable-parameter count equals PEFT's AdaLoRA, and works on a meta-device model."""
import copy

import torch
from transformers import LlamaConfig, LlamaModel

import peftkern
from tests.helpers.models import tiny_model

TINYLLAMA = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000)


def test_tinyllama_meta_count_is_the_svd_triplets_at_init_r():
    with torch.device("meta"):
        model = LlamaModel(TINYLLAMA)
    peftkern.patch(model, "adalora", rank=8, total_step=100)  # init_r = 12
    q, v = (2048 + 2048) * 12 + 12, (2048 + 256) * 12 + 12  # P, Q and Λ of q_proj and v_proj
    assert peftkern.count(model).adapter_trainable == 22 * (q + v)
    assert all(row["rank"] == 12 for row in peftkern.explain(model).rows)


def test_count_equals_peft_adalora():
    import peft

    base = tiny_model("llama")
    ours = peftkern.patch(copy.deepcopy(base), "adalora", rank=4, total_step=10)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=6, target_r=4, target_modules=["q_proj", "v_proj"], total_step=10))
    assert peftkern.count(ours).adapter_trainable == theirs.get_nb_trainable_parameters()[0]
