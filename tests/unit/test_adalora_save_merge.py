"""adalora: the native files keep every component (a resume needs the pruned ones: their P and Q keep
training), the PEFT export drops the pruned ones; load restores in place (same logits, same run), merge
folds only the kept components, and a misfit file is refused before any change. Files written when
the native save dropped pruned components still load."""
import copy

import pytest
import torch

import peftkern
from tests.helpers.models import tiny_model, tokens

SCHEDULE = dict(tinit=1, tfinal=2, deltaT=1, total_step=8)


def _trained(base):
    model = peftkern.patch(copy.deepcopy(base), "adalora", rank=2, backend="torch", **SCHEDULE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(SCHEDULE["total_step"] + 1):  # through the final mask
        ids = tokens(batch=2, seq=7, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _logits(model, ids=None):
    ids = tokens() if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def trained(base):
    return _trained(base)


def test_native_files_keep_every_component_and_the_peft_export_the_kept_ones(trained, tmp_path):
    from safetensors.torch import load_file

    state = trained.peftkern
    saved = state.tensors_for_save()
    pattern = state.rank_pattern()
    ranks = [sum(pattern[s.path]) for s in state.plan.slots]
    assert len(set(ranks)) > 1 or min(ranks) < state.plan.rank, "the schedule should prune unevenly"
    assert sum(ranks) == 2 * len(state.plan.slots)
    peftkern.export_peft(trained, tmp_path)
    exported = load_file(tmp_path / "adapter_model.safetensors")
    for s, k in zip(state.plan.slots, ranks):
        assert torch.equal(saved[f"P.{s.index}"], state.P[s.index].detach())  # pruned columns included
        assert torch.equal(saved[f"Q.{s.index}"], state.Q[s.index].detach())
        assert torch.equal(saved[f"lam.{s.index}"], state.lam[s.index].detach())
        assert exported[f"base_model.model.{s.path}.lora_A.weight"].shape == (k, s.in_features)
    pruned = ~torch.tensor([pattern[s.path] for s in state.plan.slots])
    assert any(state.P[s.index].detach()[:, pruned[s.index]].abs().sum() > 0 for s in state.plan.slots), \
        "a pruned component's P is not zero: dropping it would change a resumed run"
    extra = state.extra_config()
    assert extra["rank_pattern"] == pattern and extra["init_r"] == 3 and extra["target_r"] == 2


def test_files_that_hold_only_the_kept_components_still_load(base, trained):
    state = trained.peftkern
    pattern = state.rank_pattern()
    old = {}
    for s in state.plan.slots:  # what the native save wrote before: kept (or Λ ≠ 0) components only
        keep = torch.tensor(pattern[s.path]) | (state.lam[s.index].detach() != 0)
        old[f"P.{s.index}"] = state.P[s.index].detach()[:, keep]
        old[f"lam.{s.index}"] = state.lam[s.index].detach()[keep]
        old[f"Q.{s.index}"] = state.Q[s.index].detach()[keep]
    extra = {**state.extra_config(), "saved_components": {
        s.path: (torch.tensor(pattern[s.path]) | (state.lam[s.index].detach() != 0)).tolist()
        for s in state.plan.slots}}
    fresh = peftkern.patch(copy.deepcopy(base), "adalora", rank=2, backend="torch", **SCHEDULE).eval()
    fresh.peftkern.load_saved(old, extra)
    torch.testing.assert_close(_logits(fresh), _logits(trained), rtol=0, atol=1e-6)


def test_load_saved_restores_the_same_logits(base, trained):
    state = trained.peftkern
    fresh = peftkern.patch(copy.deepcopy(base), "adalora", rank=2, backend="torch", **SCHEDULE).eval()
    assert not torch.allclose(_logits(fresh), _logits(trained))
    fresh.peftkern.load_saved(state.tensors_for_save(), state.extra_config())
    torch.testing.assert_close(_logits(fresh), _logits(trained), rtol=0, atol=1e-6)
    assert fresh.peftkern.rank_pattern() == state.rank_pattern()
    assert [fresh.peftkern.effective_rank(s.index) for s in state.plan.slots] == \
        [state.effective_rank(s.index) for s in state.plan.slots]


def test_save_and_load_through_the_native_files(base, trained, tmp_path):
    peftkern.save(trained, tmp_path)
    reloaded = peftkern.load(copy.deepcopy(base), tmp_path, backend="torch").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(trained), rtol=0, atol=1e-6)
    assert peftkern.rank_pattern(reloaded) == peftkern.rank_pattern(trained)


def test_merge_folds_only_kept_components(trained):
    model = copy.deepcopy(trained)
    state = model.peftkern
    before = _logits(model)
    for s in state.plan.slots:  # ΔW over the kept components equals the full s·P·diag(Λ)·Q (pruned Λ = 0)
        full = state.scale * (state.P[s.index] * state.lam[s.index]) @ state.Q[s.index]
        torch.testing.assert_close(state.delta_weight(s.index), full.detach(), rtol=1e-5, atol=1e-7)
    peftkern.merge(model)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    peftkern.unmerge(model)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


def test_misfit_file_is_refused_before_any_change(base, trained):
    state = trained.peftkern
    saved, extra = state.tensors_for_save(), state.extra_config()
    fresh = peftkern.patch(copy.deepcopy(base), "adalora", rank=2, backend="torch", **SCHEDULE)
    snapshot = {k: v.clone() for k, v in fresh.peftkern.state_dict().items()}
    bad_shape = dict(saved)
    bad_shape["Q.0"] = torch.zeros(5, 32)
    missing = {k: v for k, v in saved.items() if k != "P.1"}
    wrong_pattern = {**extra, "rank_pattern": {k: v[:-1] for k, v in extra["rank_pattern"].items()}}
    for tensors, ext, match in ((bad_shape, extra, "Q.0"), (missing, extra, "P.1"),
                                (saved, wrong_pattern, "rank pattern"), (saved, {}, "rank pattern"),
                                ({**saved, "extra.0": torch.zeros(1)}, extra, "unexpected")):
        with pytest.raises(ValueError, match=match):
            fresh.peftkern.load_saved(tensors, ext)
        for k, v in fresh.peftkern.state_dict().items():
            assert torch.equal(v, snapshot[k]), f"{k} changed by a refused load"


def test_mid_budgeting_save_and_merge_keep_regrown_components(base, tmp_path):
    """During budgeting PEFT zeroes pruned Λ only at mask steps, so between them a pruned
    component can regrow and contributes to the forward: save/load and merge must keep it."""
    model = peftkern.patch(copy.deepcopy(base), "adalora", rank=2, backend="torch", tinit=1, tfinal=2, deltaT=3,
                           total_step=20)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    state = model.peftkern
    for step in range(5):  # step 3 masks; step 4 lets masked Λ regrow without masking again
        ids = tokens(batch=2, seq=7, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    regrown = (~state.allocator.keep) & (state.lam.detach() != 0)
    assert regrown.any(), "the schedule should leave a pruned component regrown"
    model.eval()
    want = _logits(model)
    peftkern.save(model, tmp_path)
    fresh = peftkern.load(copy.deepcopy(base).eval(), tmp_path)
    # dropping the regrown components would move these logits by ~4e-4 on this schedule
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=1e-6)
    assert torch.equal(fresh.peftkern.allocator.keep, state.allocator.keep)  # resume sees the same pattern
    peftkern.merge(model)
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
