"""Bad PG options: a clear error naming the problem and the valid choices, model untouched."""
import pytest
import torch

import peftkern
from tests.helpers.models import tiny_model


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            (len(model._forward_pre_hooks), len(model._forward_hooks)))


def _assert_untouched(model, snap):
    types, params, hooks = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (t, rg) in params.items():
        assert torch.equal(now[n], t) and now[n].requires_grad == rg
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert not hasattr(model, "peftkern")


# The tiny Llama has 3 layers, so only 1 and 3 divide its layer count.
@pytest.mark.parametrize("method,kwargs,exc,words", [
    ("pg_pos", dict(layers_per_hypernet=2), ValueError, ["layers_per_hypernet=2", "does not divide", "1, 3"]),
    ("pg_pos", dict(layers_per_hypernet=4), ValueError, ["does not divide", "1, 3"]),
    ("pg_pos", dict(layers_per_hypernet=0), ValueError, ["layers_per_hypernet", ">= 1"]),
    ("pg_pos", dict(layers_per_hypernet=True), TypeError, ["layers_per_hypernet"]),
    ("pg_fixed", dict(generate="C"), ValueError, ["generate='C'", "A, B, AB"]),
    ("pg_fixed", dict(generate="BA"), ValueError, ["generate='BA'", "AB"]),
    ("pg_fixed", dict(generate=1), TypeError, ["generate"]),
    ("pg_trainable", dict(other="random"), ValueError, ["other='random'", "trained, frozen"]),
    ("pg_pos", dict(embed_dim=5), ValueError, ["even embed_dim", "5"]),
    ("pg_pos", dict(embed_dim=0), ValueError, ["embed_dim", ">= 1"]),
    ("pg_pos", dict(hidden_dim=-1), ValueError, ["hidden_dim", ">= 1"]),
    ("pg_pos", dict(hidden_dim=2.5), TypeError, ["hidden_dim"]),
    ("pg_pos", dict(generate="AB", other="frozen"), ValueError, ["generate='AB'", "other='frozen'"]),
    ("pg_pos", dict(targets=["lm_head"]), ValueError, ["outside", "lm_head"]),
    ("pg_pos", dict(targets=r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.self_attn\.v_proj"),
     ValueError, ["same targets in every layer"]),
    ("pg_pos", dict(hidden=20), TypeError, ["does not take", "layers_per_hypernet"]),
])
def test_bad_input_raises_before_touching_model(method, kwargs, exc, words):
    model = tiny_model("llama")
    snap = _snapshot(model)
    with pytest.raises(exc) as info:
        peftkern.patch(model, method, rank=4, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    _assert_untouched(model, snap)


def test_odd_embed_dim_is_fine_without_positions():
    for method in ("pg_fixed", "pg_trainable"):
        model = peftkern.patch(tiny_model("llama"), method, rank=4, embed_dim=5)
        assert model.peftkern.hypernets[0]["A"].embed.shape == (3, 5)


def test_defaults_work_with_no_options():
    model = peftkern.patch(tiny_model("llama"), method="pg_pos")
    state = model.peftkern
    assert (state.plan.rank, state.plan.alpha, state.generated, state.per_layer) == (8, 16.0, ("A",), "B")
    assert len(state.hypernets) == 1 and state.hypernets[0]["A"].embed.shape == (3, 20)
