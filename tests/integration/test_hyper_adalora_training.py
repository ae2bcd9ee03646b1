"""50 training steps of a tiny Llama lower the loss with hyper_adalora, for all three hypernetworks.

The loss includes the eq. (7) orthogonality term (γ = 0.1), as the paper trains. Λ pruning runs
during the steps (total_step = 50, tinit = 5, tfinal = 10), with the default ``state_update="fixed"``.
With ``"advance"`` (eq. 4 read literally) the state absorbs every generated update, which acts as
momentum with no decay, and the loss oscillates instead of falling steadily (see the method's
docstring); the advance mechanics are tested in test_hyper_adalora_generation.py.
"""
import pytest

import peftkern
from tests.helpers.training import assert_learns, tiny_model, train_steps


@pytest.mark.parametrize("kind", ["attention", "mlp", "cnn"])
def test_fifty_steps_lower_the_loss(kind):
    model = peftkern.patch(tiny_model("llama"), "hyper_adalora", rank=4, hypernet=kind,
                           total_step=50, tinit=5, tfinal=10)
    assert_learns(train_steps(model, steps=50))
    state = model.peftkern
    assert int(state.allocator.keep.sum()) == 4 * len(state.plan.slots)  # pruned to the target budget
