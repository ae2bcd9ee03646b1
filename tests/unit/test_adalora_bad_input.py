"""Bad adalora / hyper_adalora options: a clear error naming the problem, and the model untouched."""
import gc

import pytest
import torch.optim.optimizer as optimizer_module

import peftkern
from tests.helpers.models import tiny_model

CASES = [
    # (method, options, error, message fragment)
    ("adalora", dict(rank=5, target_r=5, init_r=4, total_step=10), ValueError, "must not exceed init_r"),
    ("adalora", dict(rank=4, target_r=3, total_step=10), ValueError, "disagree"),
    ("adalora", {}, ValueError, "total_step is required"),
    ("adalora", dict(total_step=5, tinit=3, tfinal=2), ValueError, "greater than tinit \\+ tfinal"),
    ("adalora", dict(total_step=0), ValueError, "total_step must be an int >= 1"),
    ("adalora", dict(total_step="soon"), TypeError, "total_step must be an int"),
    ("adalora", dict(total_step=10, deltaT=0), ValueError, "deltaT must be an int >= 1"),
    ("adalora", dict(total_step=10, beta1=1.0), ValueError, "beta1"),
    ("adalora", dict(total_step=10, orth_reg_weight=-1), ValueError, "orth_reg_weight"),
    ("adalora", dict(total_step=10, orth_form="cubic"), ValueError, "valid choices: peft, squared"),
    ("adalora", dict(total_step=10, init_r=40), ValueError, "larger than"),
    ("adalora", dict(total_step=10, nonsense=1), TypeError, "valid options"),
    ("hyper_adalora", dict(rank=5, target_r=5, init_r=4, total_step=10), ValueError, "must not exceed init_r"),
    ("hyper_adalora", {}, ValueError, "total_step is required"),
    ("hyper_adalora", dict(total_step=3, tinit=2, tfinal=1), ValueError, "greater than tinit \\+ tfinal"),
    ("hyper_adalora", dict(total_step=10, hypernet="transformer"), ValueError, "valid choices: attention, mlp, cnn"),
    ("hyper_adalora", dict(total_step=10, deltaT=0), ValueError, "deltaT must be an int >= 1"),
    ("hyper_adalora", dict(total_step=10, deltaT=-2), ValueError, "deltaT"),
    ("hyper_adalora", dict(total_step=10, state_update="sometimes"), ValueError, "advance, fixed"),
    ("hyper_adalora", dict(total_step=10, hidden_dim=30, heads=4), ValueError, "divisible"),
    ("hyper_adalora", dict(total_step=10, hidden_dim=0), ValueError, "hidden_dim"),
]


@pytest.mark.parametrize("method,options,error,match", CASES)
def test_bad_option_raises_and_leaves_the_model_untouched(method, options, error, match):
    model = tiny_model("llama")
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = _live_hooks()
    options = dict(options)
    rank = options.pop("rank", 2)
    with pytest.raises(error, match=match):
        peftkern.patch(model, method, rank=rank, **options)
    assert not hasattr(model, "peftkern")
    assert dict(model.named_modules()) == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _live_hooks() == hooks


def test_rank_names_the_target_and_init_r_may_be_given_with_it():
    model = peftkern.patch(tiny_model("llama"), "adalora", rank=2, target_r=2, init_r=4, total_step=10)
    assert model.peftkern.plan.rank == 4 and model.peftkern.plan.options.target_r == 2
    assert model.peftkern.plan.requested_rank == 2
    # without an explicit rank, target_r alone names the target (rank is not the default 8 then)
    again = peftkern.patch(tiny_model("llama"), "adalora", target_r=2, init_r=4, total_step=10)
    assert again.peftkern.plan.options.target_r == 2 and again.peftkern.plan.rank == 4
    default = peftkern.patch(tiny_model("llama"), "adalora", total_step=10)
    assert default.peftkern.plan.options.target_r == 8 and default.peftkern.plan.rank == 12


def test_unpatch_removes_every_hook():
    model = tiny_model("llama")
    hooks = _live_hooks()
    for method in ("adalora", "hyper_adalora"):
        peftkern.patch(model, method, rank=2, total_step=10)
        assert _live_hooks() == hooks + 1
        peftkern.unpatch(model)
        assert _live_hooks() == hooks
        assert not model._forward_hooks and not model._forward_pre_hooks


def _live_hooks():
    """Live states' optimizer-step hooks after collecting dead models (torch's table holds one dispatcher)."""
    from peftkern.methods import allocator

    gc.collect()
    assert sum(h is allocator._dispatch for h in optimizer_module._global_optimizer_post_hooks.values()) <= 1
    return len(allocator._LIVE)
