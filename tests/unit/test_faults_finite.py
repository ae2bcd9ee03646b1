"""NaN / Inf in generated factors, adapter parameters or the loss: detected, named, never propagated silently."""
import pytest
import torch

import peftkern
from peftkern.app.monitor import FiniteMonitor
from tests.helpers.models import tiny_model, tokens

SLOTS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]


def patched(method, **options):
    model = tiny_model("llama", "cls", seed=0)
    peftkern.patch(model, method, rank=2, backend="torch", **options)
    return model.train()


def batch():
    return {"input_ids": tokens(2, 5), "labels": torch.tensor([0, 1])}


def test_healthy_model_passes():
    report = peftkern.check_finite(patched("pg_pos"))
    assert report.ok and report.first_bad_slot is None and report.slots_checked == 6  # 3 blocks x q, v
    assert "every factor of 6 adapted modules" in str(report)
    report.raise_if_bad()


def test_nan_in_one_layers_factor_names_that_layer():
    model = patched("lora")
    with torch.no_grad():
        model.peftkern.groups[2].A[0, 1] = float("nan")  # slot 2: block 1's q_proj
    report = peftkern.check_finite(model)
    assert report.first_bad_slot == SLOTS[2]
    assert [(f.where, f.what, f.count) for f in report.findings if f.what != "parameter"] == [(SLOTS[2], "A", 1)]
    with pytest.raises(peftkern.NonFiniteError, match=r"first bad module: model\.layers\.1\.self_attn\.q_proj"):
        report.raise_if_bad()


def test_a_nan_dora_magnitude_names_its_module():
    """A magnitude of 0 gives NaN (README, DoRA): the report named only `peftkern.dora.…magnitude_vector.2`
    and no module (a review's finding); it names the module, as for the factors."""
    model = patched("lora", use_dora=True)
    with torch.no_grad():
        model.peftkern.dora.magnitude(2)[3] = float("nan")
    report = peftkern.check_finite(model)
    assert report.first_bad_slot == SLOTS[2]
    assert [(f.where, f.what, f.count, f.source) for f in report.findings if f.what != "parameter"] == [
        (SLOTS[2], "m", 1, "DoRA magnitude")]
    assert "model.layers.1.self_attn.q_proj: factor m (DoRA magnitude) has 1 non-finite of 32 values" in str(report)


def test_nan_in_a_hypernetwork_names_every_generated_slot_and_the_parameter():
    model = patched("pg_pos")
    generator = next(m for m in model.peftkern.modules() if any(m is g for g in model.peftkern.generators()))
    with torch.no_grad():
        generator.linear2.bias[0] = float("inf")  # the first entry of A in every layer this generator serves
    report = peftkern.check_finite(model)
    slots = [f for f in report.findings if f.what != "parameter"]
    assert report.first_bad_slot == SLOTS[0]  # the first hypernetwork serves the q_proj of all 3 blocks
    assert [f.where for f in slots] == [f"model.layers.{b}.self_attn.q_proj" for b in range(3)]
    assert {f.what for f in slots} == {"A"} and all(f.source.startswith("generated") for f in slots)
    assert any(f.what == "parameter" and f.where.endswith("linear2.bias") for f in report.findings)


def test_monitor_defers_the_check_and_reports_the_step_and_the_generator():
    model = patched("pg_pos")
    monitor = FiniteMonitor(model, start_step=10)  # a resumed run: 10 steps already done
    generator_name, generator = monitor.sources[0]
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                generator.linear1.weight[0, 0] = float("nan")
        loss = model(**batch()).loss
        monitor.observe(loss)  # every=None: records on the device only, never raises by itself
    with pytest.raises(peftkern.NonFiniteError) as err:
        monitor.check(batch=batch())
    text = str(err.value)
    assert "the loss first at step 12" in text and f"{generator_name} (generated factors) first at step 12" in text
    assert f"first bad adapted module: {SLOTS[0]}" in text
    monitor.close()
    assert not generator._forward_hooks


def test_nonfinite_loss_with_finite_adapter_names_the_first_module():
    model = patched("lora")
    with torch.no_grad():
        model.model.embed_tokens.weight[batch()["input_ids"][0, 2]] = float("nan")  # a frozen base weight
    monitor = FiniteMonitor(model, every=1)
    with pytest.raises(peftkern.NonFiniteError) as err:
        monitor.observe(model(**batch()).loss, batch())
    text = str(err.value)
    assert "the loss first at step 1" in text and "every adapter factor and parameter is finite" in text
    assert "first non-finite output: model.embed_tokens" in text


def test_finite_training_never_raises():
    model = patched("tied_lora")
    monitor = FiniteMonitor(model, every=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        loss = model(**batch()).loss
        monitor.observe(loss, batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
    monitor.check()
    assert monitor.observed == 4


def test_observe_never_reads_back_to_the_host(monkeypatch):
    """The hot path (generator hooks and observe) only launches device ops: any read-back raises here."""
    model = patched("pg_pos")
    monitor = FiniteMonitor(model)
    loss = model(**batch()).loss  # the first generation creates the record: on the device too

    def sync(*args, **kwargs):
        raise AssertionError("host sync on the hot path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monitor.observe(loss)
    model(**batch())
    monitor.observe(loss)
    monkeypatch.undo()
    monitor.check()  # the one read, where the loop reads the loss anyway


def test_hyper_adalora_state_update_net_is_watched():
    model = tiny_model("llama", "cls", seed=0)
    peftkern.patch(model, "hyper_adalora", rank=2, backend="torch", total_step=10)
    monitor = FiniteMonitor(model)
    assert monitor.sources and all(any(m is g for g in model.peftkern.generators()) for _, m in monitor.sources)
    monitor.close()
