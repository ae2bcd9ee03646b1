"""hyper_adalora: |Λ| pruning meets AdaLoRA's cubic budget at the right steps with a persistent
mask and no host sync; merge, save/load round trips; parameter counts on a meta-device model."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import peftkern
from tests.helpers.models import tiny_model, tokens
from tests.helpers.sync import SyncCounter as _SyncCounter

SCHEDULE = dict(total_step=16, tinit=2, tfinal=4, deltaT=3)


def _train(model, steps, lr=1e-2, monkeypatch=None):
    state = model.peftkern
    opt = torch.optim.AdamW(state.parameters(), lr=lr)
    if monkeypatch is not None:  # count host syncs inside the hook only (AdamW itself reads its step count)
        real = state.after_optimizer_step

        def counted():
            counter = _SyncCounter(monkeypatch)
            real()
            monkeypatch.undo()
            assert counter.calls == [], f"host sync in the step hook: {counter.calls}"

        state.after_optimizer_step = counted
    kept = []
    for step in range(steps):
        ids = tokens(batch=2, seq=7, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()  # the hook prunes on schedule and advances the state
        opt.zero_grad()
        kept.append(state.allocator.keep.clone())
    return kept


def test_pruning_meets_the_budget_on_schedule_and_never_regrows(monkeypatch):
    model = peftkern.patch(tiny_model("llama"), "hyper_adalora", rank=2, backend="torch", **SCHEDULE)
    state = model.peftkern
    sched = state.allocator.schedule
    kept = _train(model, SCHEDULE["total_step"] + 2, monkeypatch=monkeypatch)
    alive = state.plan.rank * len(state.plan.slots)
    for step, keep in enumerate(kept):
        budget, due = sched.budget(step)
        if step <= sched.final_step and (due or step == sched.final_step):
            alive = min(alive, budget)
        assert int(keep.sum()) == alive, f"step {step}"
        if step:
            assert not torch.any(keep & ~kept[step - 1]), "a pruned component came back"
    assert alive == 2 * len(state.plan.slots)  # target_r on average at the end
    with torch.no_grad():
        lam = torch.stack([state.factors(s.index).u for s in state.plan.slots])
    assert torch.all(lam[~state.allocator.keep] == 0)


def test_pruner_takes_the_smallest_generated_magnitudes():
    model = peftkern.patch(tiny_model("llama"), "hyper_adalora", rank=2, backend="torch", total_step=4, tinit=0)
    state = model.peftkern
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    lam = state._pass.value.lam.detach().abs().clone()
    state.after_optimizer_step()  # step 0 == tinit: no pruning yet
    state.after_optimizer_step()  # step 1: budget int(6·(1-1/4)³·... ) of the cubic schedule
    budget, _ = state.allocator.schedule.budget(1)
    keep = state.allocator.keep
    assert int(keep.sum()) == budget < lam.numel()
    # Φ did not move and the output projections are still zero, so step 1 generated the same Λ
    assert lam[keep].min() >= lam[~keep].max()


@pytest.mark.parametrize("kind", ["attention", "mlp", "cnn"])
def test_merge_and_save_load_round_trip(kind, tmp_path):
    base = tiny_model("llama")
    model = peftkern.patch(copy.deepcopy(base), "hyper_adalora", rank=2, backend="torch", hypernet=kind,
                           total_step=6, tinit=1, tfinal=2)
    _train(model, 7, lr=5e-2)
    model.eval()
    ids = tokens()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peftkern.save(model, tmp_path)
        peftkern.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
        peftkern.unmerge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
        reloaded = peftkern.load(copy.deepcopy(base), tmp_path, backend="torch").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=0, atol=1e-6)
    assert peftkern.rank_pattern(reloaded) == peftkern.rank_pattern(model)
    assert sum(map(sum, peftkern.rank_pattern(model).values())) == 2 * len(model.peftkern.plan.slots)


TINYLLAMA = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000)


def _core_params(kind, h):
    if kind == "attention":  # qkv, output projection, two LayerNorms, the 4h feed-forward
        return (3 * h * h + 3 * h) + (h * h + h) + 2 * (2 * h) + (4 * h * h + 4 * h) + (4 * h * h + h)
    if kind == "mlp":
        return (4 * h * h + 4 * h) + (4 * h * h + h)
    return (h * 4 * h * 3 + 4 * h) + (4 * h * h * 3 + h)  # two Conv1d, kernel 3


@pytest.mark.parametrize("kind", ["attention", "mlp", "cnn"])
def test_counts_on_a_meta_model(kind):
    with torch.device("meta"):
        model = LlamaModel(TINYLLAMA)
    peftkern.patch(model, "hyper_adalora", rank=8, total_step=100, hypernet=kind)
    h = 32
    projections = {"P": (2048, 256), "lam": (1,), "Q": (2048,)}  # distinct token lengths per kind
    expected = sum(_core_params(kind, h) + sum(2 * L * h + h + L for L in lengths)
                   for lengths in projections.values())
    counts = peftkern.count(model)
    assert counts.adapter_trainable == counts.adapter_total == expected  # the states are buffers, not counted
    assert all(row["rank"] == 12 for row in peftkern.explain(model).rows)
    table = peftkern.parameter_table(TINYLLAMA, "hyper_adalora", rank=8, total_step=100, hypernet=kind)
    assert f"{expected:,}" in table


def test_nan_components_are_pruned_first_and_the_count_holds():
    from peftkern.methods.allocator import MagnitudePruner, Schedule

    pruner = MagnitudePruner(Schedule.checked(3, 1, 2, 0, 0, 1, 4), 2, 3, torch.device("cpu"))
    lam = torch.tensor([[0.5, float("nan"), 0.1], [0.2, 0.3, float("nan")]])
    pruner.allocate(1, lam)  # budget int(4·(3/4)³ + 2) = 3 of 6: both NaN and 0.1 go
    assert pruner.keep.tolist() == [[True, False, False], [True, True, False]]
    pruner.allocate(3, lam)  # budget int(4·(1/4)³ + 2) = 2: 0.2 goes
    assert pruner.keep.tolist() == [[True, False, False], [False, True, False]]
