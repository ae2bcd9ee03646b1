"""50 training steps of a tiny Llama lower the loss with every PG variant."""
import pytest

import peftkern
from tests.helpers.training import assert_learns, tiny_model, train_steps

VARIANTS = [(generate, other) for generate in ("A", "B", "AB") for other in ("trained", "frozen")
            if (generate, other) != ("AB", "frozen")]  # AB leaves nothing to freeze


@pytest.mark.parametrize("method", ["pg_fixed", "pg_trainable", "pg_pos"])
@pytest.mark.parametrize("generate,other", VARIANTS)
def test_fifty_steps_lower_the_loss(method, generate, other):
    model = peftkern.patch(tiny_model("llama"), method, rank=4, generate=generate, other=other)
    assert_learns(train_steps(model, steps=50))


@pytest.mark.parametrize("hidden_dim", [1, 20])
def test_pg_pos_trains_with_either_hypernet_width(hidden_dim):
    model = peftkern.patch(tiny_model("llama"), "pg_pos", rank=4, hidden_dim=hidden_dim)
    assert_learns(train_steps(model, steps=50))


def test_grouped_hypernetworks_train():
    model = peftkern.patch(tiny_model("llama"), "pg_pos", rank=4, generate="AB", layers_per_hypernet=1)
    assert_learns(train_steps(model, steps=50))
