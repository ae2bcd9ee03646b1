"""Property-based: patch / merge / unmerge / unpatch invariants over methods, method options and ranks.

For a random method configuration on a tiny Llama (3 blocks, GQA: k/v narrower than q):

* unpatch after patch gives back the original model bit for bit (module objects, tensors,
  requires_grad flags);
* with the adapter's trained tensors perturbed away from their (often identity) initial
  values, merge does not change the output, and unmerge restores the base weights to
  rounding; the output then equals the unmerged one;
* the adapter's parameters are registered once (model.parameters() has no duplicates)
  and every trained one gets a gradient.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftkern
from peftkern import patching
from tests.helpers.models import tiny_model, tokens

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
TARGETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj"], ["o_proj", "down_proj"]]


def letters(alphabet, min_size=1):
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=len(alphabet), unique=True).map("".join)


@st.composite
def configuration(draw):
    method = draw(st.sampled_from(["lora", "tied_lora", "vera", "pg_pos", "pg_fixed", "pg_trainable", "adalora"]))
    rank = draw(st.integers(1, 4))
    targets = draw(st.sampled_from(TARGETS))
    options = {}
    if method == "lora":
        options = {"train": draw(st.sampled_from(["AB", "B"])), "joint": draw(st.booleans())}
    elif method == "tied_lora":
        options = {"tie": draw(letters("AB", 0)), "train": draw(letters("ABuv")), "joint": draw(st.booleans())}
    elif method.startswith("pg"):
        generate = draw(st.sampled_from(["A", "B", "AB"]))
        other = "trained" if generate == "AB" else draw(st.sampled_from(["trained", "frozen"]))
        options = {"generate": generate, "other": other, "embed_dim": draw(st.sampled_from([2, 4])),
                   "hidden_dim": draw(st.integers(1, 6)), "layers_per_hypernet": draw(st.sampled_from([None, 1, 3]))}
    elif method == "adalora":
        options = {"init_r": rank + draw(st.integers(0, 2)), "total_step": 10}
    if options.get("joint") and targets == ["o_proj", "down_proj"]:
        targets = ["q_proj", "v_proj"]  # the joint form groups a layer's targets that share an input
    return method, rank, targets, options


def perturb(state):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in state.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@settings(max_examples=20, **SETTINGS)
@given(configuration())
def test_patch_merge_unpatch_invariants(config):
    method, rank, targets, options = config
    model = tiny_model("llama", "base", seed=0)
    x = tokens(2, 5)
    modules = dict(model.named_modules())
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        base_out = model(input_ids=x).last_hidden_state

    peftkern.patch(model, method, rank=rank, targets=targets, backend="torch", **options)
    state = patching.state_of(model)
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    perturb(state)
    out = model(input_ids=x).last_hidden_state
    assert not torch.allclose(out, base_out, atol=1e-4), f"{method} {options}: the adapter changes nothing"
    out.square().mean().backward()
    trained = [n for n, p in state.named_parameters() if p.requires_grad]
    assert trained and all(dict(state.named_parameters())[n].grad is not None for n in trained)

    with torch.no_grad():
        peftkern.merge(model)
        merged_out = model(input_ids=x).last_hidden_state
        peftkern.unmerge(model)
        unmerged_out = model(input_ids=x).last_hidden_state
    torch.testing.assert_close(merged_out, out.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unmerged_out, out.detach(), rtol=1e-4, atol=1e-5)
    for path, m in patching.adapted_modules(model):
        torch.testing.assert_close(m.base_layer.weight, tensors[f"{path}.weight"], rtol=0, atol=1e-6)

    peftkern.unpatch(model)
    assert not patching.is_patched(model)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    restored = model.state_dict()
    assert restored.keys() == tensors.keys()
    bitwise = [k for k in tensors if not torch.equal(restored[k], tensors[k])]
    assert not bitwise or all(k.rsplit(".", 2)[-2] in {t for t in targets} for k in bitwise), bitwise
    for k in tensors:
        torch.testing.assert_close(restored[k], tensors[k], rtol=0, atol=1e-6)


@settings(max_examples=10, **SETTINGS)
@given(configuration())
def test_unpatch_without_merge_is_bit_exact(config):
    method, rank, targets, options = config
    model = tiny_model("llama", "base", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftkern.patch(model, method, rank=rank, targets=targets, backend="torch", **options)
    perturb(patching.state_of(model))
    model(input_ids=tokens(1, 3)).last_hidden_state.sum().backward()
    peftkern.unpatch(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
