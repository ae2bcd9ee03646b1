"""benchmarks/accuracy_table.py end to end on a tiny model and tiny data: the rate chosen on the
held-out split, every seed at it, tables written, finished runs read back instead of rerun."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers.data import save_tiny_bert, write_sst2_like

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("accuracy_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_row_chooses_its_rate_on_held_out_data_and_writes_tables(table, tmp_path, capsys):
    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2_like(tmp_path / "glue", n_train=40, n_dev=8)
    row = table.Row("LoRA, A frozen (A_F B_L)", "lora", {"train": "B"}, alpha=16.0)
    budget = table.Budget({"sst2": None}, {"sst2": 1}, 8, 16)
    out_dir = tmp_path / "runs"
    lr, tried = table.choose_rate(row, "sst2", 1, budget, str(data), str(model), out_dir, grid=(1e-3, 1e-2))
    record = table.run_row(row, "sst2", [1, 2], budget, str(data), str(model), out_dir, lr, tried)
    out = capsys.readouterr().out
    assert "lr 0.001: held-out" in out and "lr 0.01: held-out" in out
    assert record["lr"] in (1e-3, 1e-2) and set(record["grid"]) == {"0.001", "0.01"}
    assert record["n_seeds"] == 2 and record["train_samples"] == 36 and record["eval_samples"] == 8  # 9:1 split
    table.write_tables([record], tmp_path / "results", "accuracy_table_tiny", budget, [1, 2], "tiny-bert",
                       {"sst2": 0.5}, "sst2")
    md = (tmp_path / "results" / "accuracy_table_tiny.md").read_text()
    assert "| LoRA, A frozen (A_F B_L) |" in md and "±" in md and "Majority class: sst2 0.5000" in md
    with open(tmp_path / "results" / "accuracy_table_tiny.csv") as f:
        got = list(csv.DictReader(f))
    assert float(got[0]["mean"]) == pytest.approx(record["mean"], abs=1e-4)


def test_rows_cover_every_method_and_a_f_b_l(table):
    import peftkern

    assert {r.method for r in table.ROWS} == set(peftkern.methods())
    assert any(r.options == {"train": "B"} for r in table.ROWS)
    full = table.BUDGETS["full"]
    assert full.train_samples["mrpc"] is None and full.epochs["mrpc"] >= 3  # all of MRPC's training set


def test_finished_runs_are_read_back_and_a_changed_config_reruns(table, tmp_path, monkeypatch):
    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2_like(tmp_path / "glue", n_train=40, n_dev=8)
    row = table.Row("LoRA (A_L B_L)", "lora", alpha=16.0)
    budget = table.Budget({"sst2": None}, {"sst2": 1}, 8, 16)
    first = table.run_row(row, "sst2", [1, 2], budget, str(data), str(model), tmp_path / "runs", 1e-3)
    ran = []
    real = table.train.finetune
    monkeypatch.setattr(table.train, "finetune", lambda cfg: ran.append(cfg.seed) or real(cfg))
    again = table.run_row(row, "sst2", [1, 2], budget, str(data), str(model), tmp_path / "runs", 1e-3)
    assert ran == [] and again["values"] == first["values"]  # both seeds read back
    longer = table.Budget({"sst2": None}, {"sst2": 2}, 8, 16)  # same folders, another epoch count
    table.run_row(row, "sst2", [1], longer, str(data), str(model), tmp_path / "runs", 1e-3)
    assert ran == [1]


def test_a_run_whose_loop_filled_in_its_training_length_is_read_back(table, tmp_path, monkeypatch):
    # AdaLoRA's total_step is filled in by the loop and recorded in metrics.json; the table's
    # config leaves it to the loop, and that is the same run
    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2_like(tmp_path / "glue", n_train=40, n_dev=8)
    row = table.Row("AdaLoRA", "adalora", alpha=None)
    budget = table.Budget({"sst2": None}, {"sst2": 1}, 8, 16)
    first = table.run_row(row, "sst2", [1], budget, str(data), str(model), tmp_path / "runs", 1e-3)
    ran = []
    monkeypatch.setattr(table.train, "finetune", lambda cfg: ran.append(cfg.seed))
    again = table.run_row(row, "sst2", [1], budget, str(data), str(model), tmp_path / "runs", 1e-3)
    assert ran == [] and again["values"] == first["values"]
