"""Per-training-step benchmark of a whole model (PEFTKERN_BENCH_MODEL, default the tiny CI
Llama): each method against its peer, and the frozen-base floor, in one group each.

pytest-benchmark runs tests one after another, and on a shared machine the floor drifts by
several percent between them, more than an adapter costs. So each provider's test also runs
a floor step before every timed round (untimed by pytest-benchmark, timed here with the same
timer) and records the median as ``extra_info["floor_interleaved_s"]``: its overhead is taken
against the floor measured alongside it (benchmarks/targets.py).

A step is forward (with the method's regulariser), backward, optimizer step and allocation:
PEFT's AdaLoRA calls ``update_and_allocate`` after every step; ours allocates in its optimizer
step hook (tinit = tfinal = 0, ΔT = 1 on both sides). Before timing, each provider's task loss
at initialisation must equal the floor's (every method starts at ΔW = 0), and for ours a
perturbed copy exported with ``export_peft`` must give PEFT's loss (see common.py).
"""
import importlib
import statistics

import pytest
import torch
from common import PROVIDERS, assert_matches_peft_export, assert_same_initial_loss, rounds, task_loss

GROUPS = {
    "lora": ["floor", "lora", "lora_torch", "peft_lora"],
    "vera": ["floor", "vera", "peft_vera"],
    "adalora": ["floor", "adalora", "peft_adalora"],
    "pg_vs_lora": ["floor", "lora", "pg_pos", "pg_trainable", "pg_fixed", "tied_lora"],
    "hyper_adalora": ["floor", "adalora", "hyper_adalora"],
}
CASES = [(group, name) for group, names in GROUPS.items() for name in names]


def bench_timer(config):
    """The clock pytest-benchmark times with (--benchmark-timer): a callable, or its dotted name."""
    timer = config.getoption("benchmark_timer")
    if isinstance(timer, str):
        module, _, attr = timer.rpartition(".")
        timer = getattr(importlib.import_module(module), attr)
    return timer


@pytest.fixture(scope="module")
def floor_loss(spec, base, batch):
    with torch.no_grad():
        return task_loss(PROVIDERS["floor"].make(base, spec).model, batch, spec.task)


@pytest.fixture(scope="module")
def floor_runner(spec, base):
    return PROVIDERS["floor"].make(base, spec)


@pytest.fixture(scope="module")
def export_checked():
    return set()  # ours: the export check runs once per provider, not once per group


@pytest.mark.parametrize("group,name", CASES, ids=[f"{g}-{n}" for g, n in CASES])
def test_step(benchmark, request, group, name, spec, base, batch, floor_loss, floor_runner, export_checked):
    provider = PROVIDERS[name]
    runner = provider.make(base, spec)
    assert_same_initial_loss(runner, floor_loss, batch, spec)
    if provider.exports_to_peft and name not in export_checked:
        assert_matches_peft_export(provider, base, batch, spec)
        export_checked.add(name)
    benchmark.group = f"step {spec.name} ({spec.layers} layers, {spec.batch}x{spec.seq}): {group}"
    benchmark.extra_info.update(provider=name, impl=provider.impl, group=group, model=spec.name)
    timer = bench_timer(request.config)
    floor_times = []

    def floor_step():  # pedantic's setup: runs before every round, outside the timed region
        if name != "floor":
            t0 = timer()
            floor_runner.step(batch)
            floor_times.append(timer() - t0)

    loss = benchmark.pedantic(runner.step, args=(batch,), setup=floor_step, rounds=rounds(), warmup_rounds=1,
                              iterations=1)
    assert torch.isfinite(loss)
    if floor_times:
        benchmark.extra_info["floor_interleaved_s"] = statistics.median(floor_times)
