"""50 training steps of a tiny Llama lower the loss with every Tied-LoRA configuration."""
import pytest

import peftkern
from tests.helpers.training import assert_learns, tiny_model, train_steps

QKV = ["q_proj", "k_proj", "v_proj"]
CONFIGS = [
    ("lora", {}),
    ("lora", dict(train="B")),
    ("vera", {}),
    ("tied_lora", dict(tie="", train="AB", joint=True)),
    ("tied_lora", dict(tie="AB", train="AB", joint=True)),
    ("tied_lora", dict(tie="AB", train="ABuv", joint=True)),
    ("tied_lora", dict(tie="AB", train="Bu", joint=True)),
    ("tied_lora", dict(tie="AB", train="B", joint=True)),
    ("tied_lora", dict(tie="AB", train="Auv", joint=True)),
    ("tied_lora", dict(tie="AB", train="A", joint=True)),
    ("tied_lora", dict(tie="AB", train="uv", joint=True)),
    ("tied_lora", dict(tie="AB", train="ABuv")),
]


@pytest.mark.parametrize("method,options", CONFIGS)
def test_fifty_steps_lower_the_loss(method, options):
    model = peftkern.patch(tiny_model("llama"), method, rank=4, targets=QKV, **options)
    assert_learns(train_steps(model, steps=50))
