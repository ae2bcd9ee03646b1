"""adalora's allocator: PEFT's budget schedule, no host sync on the step path, and allocation that
runs by itself after each optimizer step (once per step, also with gradient accumulation)."""
import copy
import gc
import types

import pytest
import torch
import torch.optim.optimizer as optimizer_module

import peftkern
from peftkern import stamps  # noqa: F401  (registers its one global step counter before any count here)
from peftkern.methods.allocator import Schedule
from tests.helpers.models import tiny_model, tokens
from tests.helpers.sync import SyncCounter as _SyncCounter

SCHEDULE = dict(tinit=2, tfinal=3, deltaT=2, total_step=14)


def _patched(**kw):
    opts = {**SCHEDULE, **kw}
    return peftkern.patch(tiny_model("llama"), "adalora", rank=2, backend="torch", **opts)


def _backward(model, seed=0):
    ids = tokens(batch=2, seq=7, seed=seed)
    model(input_ids=ids, labels=ids).loss.backward()


def _optimizer(model, lr=1e-2):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


@pytest.mark.parametrize("init_r,target_r,slots,tinit,tfinal,deltaT,total", [
    (12, 8, 6, 0, 0, 1, 20), (6, 4, 6, 2, 3, 2, 14), (9, 1, 4, 5, 7, 3, 40), (3, 3, 2, 0, 1, 1, 5)])
def test_budget_schedule_is_peft_budget_schedule(init_r, target_r, slots, tinit, tfinal, deltaT, total):
    from peft.tuners.adalora.layer import RankAllocator

    ours = Schedule.checked(init_r, target_r, slots, tinit, tfinal, deltaT, total)
    theirs = types.SimpleNamespace(init_bgt=init_r * slots, target_bgt=target_r * slots,
                                   peft_config=types.SimpleNamespace(tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                                                                     total_step=total))
    for step in range(total + 3):
        assert ours.budget(step) == RankAllocator.budget_schedule(theirs, step), step


def test_allocation_never_syncs_with_the_host(monkeypatch):
    """Every phase (warm-up, masking with kthvalue, the forced final mask, final fine-tuning) runs
    with no .item()/.tolist()/bool(tensor)/.cpu() on the step path."""
    model = _patched()
    state = model.peftkern
    phases = set()
    for step in range(SCHEDULE["total_step"] + 2):
        _backward(model, seed=step)
        counter = _SyncCounter(monkeypatch)
        state.after_optimizer_step()  # what the optimizer hook calls
        monkeypatch.undo()
        assert counter.calls == [], f"host sync at step {step}: {counter.calls}"
        model.zero_grad()
        final = state.allocator.schedule.final_step
        phases.add("warm-up" if step <= 2 else "budgeting" if step < final else "final" if step == final else "after")
    assert phases == {"warm-up", "budgeting", "final", "after"}
    assert state.effective_rank(0) <= 3 and sum(map(sum, state.rank_pattern().values())) == 2 * len(state.plan.slots)


def test_sync_counter_catches_a_sync(monkeypatch):
    counter = _SyncCounter(monkeypatch)
    torch.ones(2).sum().item()
    monkeypatch.undo()
    assert counter.calls == ["item"]


def test_allocation_runs_by_itself_in_a_plain_loop():
    model = _patched()
    state = model.peftkern
    opt = _optimizer(model)
    head_only = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # holds no adapter parameter
    for step in range(SCHEDULE["total_step"] + 2):
        _backward(model, seed=step)
        opt.step()
        head_only.step()
        opt.zero_grad()
        assert state.allocator.global_step == step + 1
        budget, _ = state.allocator.schedule.budget(step)
        if step >= state.allocator.schedule.final_step:  # the final pattern, and Λ stays masked
            assert int(state.allocator.keep.sum()) == budget == 2 * len(state.plan.slots)
            assert torch.all(state.lam[~state.allocator.keep] == 0)
    # unpatch removes the hook: stepping an optimizer over the old parameters no longer allocates
    peftkern.unpatch(model)
    state.lam.grad = torch.ones_like(state.lam)
    opt.step()
    assert state.allocator.global_step == SCHEDULE["total_step"] + 2


def test_gradient_accumulation_allocates_once_per_optimizer_step():
    model = _patched()
    state = model.peftkern
    opt = _optimizer(model)
    for step in range(4):
        for micro in range(3):
            _backward(model, seed=10 * step + micro)
        opt.step()
        opt.zero_grad()
    assert state.allocator.global_step == 4


def test_budgeting_masks_to_the_cubic_budget_on_deltaT_steps():
    model = _patched()
    state = model.peftkern
    opt = _optimizer(model)
    sched = state.allocator.schedule
    for step in range(sched.final_step):
        _backward(model, seed=step)
        opt.step()
        budget, due = sched.budget(step)
        kept = int(state.allocator.keep.sum())
        if due:  # exactly `budget` triplets survive a masking step (no ties with random scores)
            assert kept == budget and int((state.lam != 0).sum()) == budget
        opt.zero_grad()


def test_same_run_twice_gives_the_same_pattern():
    base = tiny_model("llama")
    patterns = []
    for _ in range(2):
        model = peftkern.patch(copy.deepcopy(base), "adalora", rank=2, backend="torch", **SCHEDULE)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.peftkern.parameters():
                p.normal_(0, 0.1)
        opt = _optimizer(model)
        for step in range(SCHEDULE["total_step"]):
            _backward(model, seed=step)
            opt.step()
            opt.zero_grad()
        patterns.append(peftkern.rank_pattern(model))
    assert patterns[0] == patterns[1]


def test_total_step_auto_without_the_callback_says_what_to_do():
    model = peftkern.patch(tiny_model("llama"), "adalora", rank=2, total_step="auto", backend="torch")
    _backward(model)
    with pytest.raises(RuntimeError, match="AllocatorCallback"):
        _optimizer(model).step()
    model.peftkern.allocator.set_total_step(5)
    _optimizer(model).step()  # now it allocates
    assert model.peftkern.allocator.global_step == 1


def test_explain_reports_kept_ranks_and_importance_path():
    model = _patched()
    opt = _optimizer(model)
    _backward(model)
    opt.step()
    rows = peftkern.explain(model).rows
    assert all(row["rank"] == 3 for row in rows)  # warm-up: nothing pruned yet (init_r = 3 for rank 2)
    assert all("Λ" in row["u"] and "3/3 kept" in row["u"] for row in rows)
    assert rows[0]["importance"] in ("cpp", "torch")


@pytest.mark.parametrize("method", ["adalora", "hyper_adalora"])
def test_a_copied_model_allocates_for_itself(method):
    hooks = _live_hooks()
    model = peftkern.patch(tiny_model("llama"), method, rank=2, backend="torch", total_step=10)
    _backward(model)  # leaves a generated (graph-holding) cache in hyper_adalora
    twin = copy.deepcopy(model)
    assert _live_hooks() == hooks + 2
    hooks_of_twin = list(twin._forward_hooks.values()) + list(twin._forward_pre_hooks.values())
    # every hook (the loss hook, a generation cache's pass markers) serves the copy's own state
    assert all(h.state is twin.peftkern for h in hooks_of_twin if hasattr(h, "state"))
    assert all(h.cache is twin.peftkern._pass for h in hooks_of_twin if hasattr(h, "cache"))
    opt = _optimizer(twin)
    _backward(twin)
    opt.step()
    assert twin.peftkern.allocator.global_step == 1 and model.peftkern.allocator.global_step == 0
    peftkern.unpatch(twin)
    peftkern.unpatch(model)
    assert _live_hooks() == hooks


def _live_hooks():
    """Live states' optimizer-step hooks after collecting dead models (their hooks go with them); torch's
    global table holds one dispatcher for all of them, whatever the number of models."""
    from peftkern.methods import allocator

    gc.collect()
    assert sum(h is allocator._dispatch for h in optimizer_module._global_optimizer_post_hooks.values()) <= 1
    return len(allocator._LIVE)


@pytest.mark.parametrize("method", ["adalora", "hyper_adalora"])
def test_allocator_checkpoint_resumes_exactly(method):
    base = tiny_model("llama")
    opts = dict(total_step=10, tinit=1, tfinal=2)

    def fresh():
        torch.manual_seed(0)
        return peftkern.patch(copy.deepcopy(base), method, rank=2, backend="torch", **opts)

    def steps(model, opt, start, stop):
        for step in range(start, stop):
            _backward(model, seed=step)
            opt.step()
            opt.zero_grad()

    straight = fresh()
    steps(straight, opt := _optimizer(straight), 0, 10)
    first = fresh()
    steps(first, opt := _optimizer(first), 0, 5)
    saved = (copy.deepcopy(first.peftkern.state_dict()), first.peftkern.allocator.checkpoint(), opt.state_dict())
    resumed = fresh()
    resumed.peftkern.load_state_dict(saved[0])
    resumed.peftkern.allocator.restore(saved[1])
    opt = _optimizer(resumed)
    opt.load_state_dict(saved[2])
    steps(resumed, opt, 5, 10)
    assert resumed.peftkern.allocator.global_step == 10
    assert peftkern.rank_pattern(resumed) == peftkern.rank_pattern(straight)
    for a, b in zip(resumed.peftkern.state_dict().values(), straight.peftkern.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="allocator"):
        resumed.peftkern.allocator.restore({**saved[1], "buffers": {}})


def test_a_dropped_model_collected_inside_another_optimizers_step_is_harmless():
    """A patched AdaLoRA model dropped without unpatch is freed by the cyclic GC, which may run inside
    another optimizer's step, while torch iterates its step hooks: the model's hook left that table
    then, and the step raised "OrderedDict mutated during iteration" (a review's finding)."""
    handle = optimizer_module.register_optimizer_step_post_hook(lambda *args: gc.collect())
    try:
        for _ in range(2):
            model = peftkern.patch(tiny_model("llama"), "adalora", rank=2, total_step=10, tinit=0, tfinal=0, deltaT=1)
            del model  # a reference cycle (the state and its hook handle): only the GC frees it
        w = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([w], lr=0.1)
        w.sum().backward()
        opt.step()
    finally:
        handle.remove()


def test_scores_start_at_zero_after_materialising_from_meta():
    """to_empty gives the allocator's non-persistent importance scores memory without values, which no
    load fills: they held up to 1e38 and pruned other ranks (a review's finding). They start at zero, as at
    patch time; a move of real tensors keeps them."""
    with torch.device("meta"):
        model = tiny_model("llama")
    peftkern.patch(model, "adalora", rank=4, total_step=10)
    garbage = lambda t: torch.full(t.shape, 1e30 if t.is_floating_point() else 1, dtype=t.dtype, device="cpu")  # noqa: E731
    model._apply(garbage)  # what to_empty leaves, made visible
    allocator = model.peftkern.rank_allocator()
    scores = [allocator.lam_ipt, allocator.lam_unc, *(t for s in allocator.slot_scores for t in s.buffers())]
    assert all(not t.is_meta and not t.any() for t in scores)
    for t in scores:
        t.fill_(3.0)
    model.to(torch.float64)
    assert all(bool((t == 3.0).all()) for t in scores)
