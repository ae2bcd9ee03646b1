"""Every method trains out of the box, and Parameter Generation is stable at LoRA's learning rates.

Both run the embedded demo's budget (MiniLM, the shipped SST-2 sample, 3 epochs of batch 32:
about 40 s a run on 2 cores), so they are marked slow; CI runs them.
"""
import json

import pytest

from peftkern.app import cli, glue, train
from peftkern.methods import registry


def majority() -> float:
    splits = glue.load_splits(glue.get_task("sst2"), train.embedded_data_dir())
    labels = list(splits.eval["label"])
    return max(labels.count(v) for v in set(labels)) / len(labels)


@pytest.mark.parametrize("method", registry.names())
def test_finetune_at_its_defaults_trains_every_method(method, tmp_path, capsys):
    """`peftkern finetune --method M` alone: at least the majority class + 15 points on the sample's dev set."""
    assert cli.main(["finetune", "--method", method, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    spec = registry.get(method)
    assert metrics["config"]["lr"] == spec.lr.demo  # the method's own demo rate, and the CLI says so
    assert f"learning rate {spec.lr.demo:g} (chosen on a held-out" in capsys.readouterr().out
    assert metrics["value"] >= majority() + 0.15, (method, metrics["value"])


@pytest.mark.parametrize("lr", [5e-4, 2e-3, 5e-3])
def test_pg_pos_trains_like_lora_at_loras_learning_rates(lr, tmp_path):
    """LEFT's PG at the learning rates LoRA users use: within 2 points of LoRA or above, never the
    majority class (before generated factors started at LoRA's scale and pace, pg_pos collapsed
    to the majority class at 1e-2 and learnt nothing on a held-out regression task at 2e-3)."""
    demo = {k: v for k, v in cli.DEMO.items() if k != "lr"}
    values = {}
    for method in ("lora", "pg_pos"):
        config = train.RunConfig(data_dir=train.embedded_data_dir(), method=method, alpha=16.0, lr=lr,
                                 progress=False, output_dir=str(tmp_path / method), **demo)
        values[method] = train.finetune(config).value
    assert values["pg_pos"] >= values["lora"] - 0.02, values
    assert values["pg_pos"] > majority() + 0.05, values
