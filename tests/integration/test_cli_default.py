"""The embedded default, `peftkern finetune` with no model, task or data: pretrained MiniLM on the
shipped SST-2 sample, fully offline. Here on a very small budget; the full default run (a few
minutes) is measured by hand and reported in the README."""
import json
from pathlib import Path

import pytest

import peftkern
from peftkern.app import cli, glue, train


def test_embedded_sample_is_small_and_attributed():
    data = Path(train.embedded_data_dir())
    splits = glue.load_splits(glue.get_task("sst2"), str(data))
    assert splits.sizes == {"train": 2000, "eval": 400}
    assert set(splits.train["label"]) == {0, 1}
    readme = (data / "README.md").read_text()
    assert "Socher" in readme and "GLUE" in readme


@pytest.mark.skipif("pg_pos" not in peftkern.methods(), reason="pg_pos is not registered yet")
def test_default_run_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "default"
    argv = ["finetune", "--max-train-samples", "64", "--max-eval-samples", "32", "--epochs", "1",
            "--output-dir", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "pg_pos" and m["task"] == "sst2" and m["sizes"] == {"train": 64, "eval": 32}
    from peftkern.methods import registry

    assert m["config"]["model"] == train.default_model()
    assert m["config"]["lr"] == registry.get("pg_pos").lr.demo and "held-out" in m["config"]["lr_source"]
    assert all(x == x for x in m["step_losses"]) and 0.0 <= m["value"] <= 1.0
    for name in ("peftkern_config.json", "peftkern_model.safetensors", "curves.png"):
        assert (out / name).is_file()
    cfg = json.loads((out / "peftkern_config.json").read_text())
    assert cfg["method"] == "pg_pos" and cfg["heads"] == ["classifier.bias", "classifier.weight"]
    printed = capsys.readouterr().out
    assert "embedded SST-2 sample" in printed and f"learning rate {registry.get('pg_pos').lr.demo:g} (chosen on" in printed
