"""benchmarks/accuracy_table.py end to end on a tiny model and tiny data: tables written, missing methods skipped."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.test_cli_finetune import save_tiny_bert, write_sst2_like

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("accuracy_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_sweep_writes_markdown_and_csv(table, tmp_path, capsys):
    model = save_tiny_bert(tmp_path / "model")
    data = write_sst2_like(tmp_path / "glue", n_train=16, n_dev=8)
    rows = (table.Row("Not yet", "no_such_method"), table.Row("LoRA, A frozen (A_F B_L)", "lora", {"train": "B"}))
    budget = table.Budget(16, 8, 1, 8, 1e-3, 16)
    records = table.run(["sst2"], [1, 2], budget, str(data), str(model), tmp_path / "runs", rows=rows,
                        progress=False)
    assert "skipping Not yet: method 'no_such_method' is not registered" in capsys.readouterr().out
    assert [r["row"] for r in records] == ["LoRA, A frozen (A_F B_L)"]
    assert records[0]["n_seeds"] == 2 and len(records[0]["values"]) == 2
    assert records[0]["train_samples"] == 16 and records[0]["eval_samples"] == 8
    table.write_tables(records, tmp_path / "results", "tiny", budget, [1, 2], "tiny-bert")
    md = (tmp_path / "results" / "accuracy_table_tiny.md").read_text()
    assert "| LoRA, A frozen (A_F B_L) |" in md and "sst2 (accuracy)" in md and "±" in md
    with open(tmp_path / "results" / "accuracy_table_tiny.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["row"] for r in got] == [r["row"] for r in records]
    assert float(got[0]["mean"]) == pytest.approx(records[0]["mean"], abs=1e-4)


def test_rows_cover_the_readme_table(table):
    methods = [(r.method, r.options) for r in table.ROWS]
    assert methods == [("lora", {}), ("lora", {"train": "B"}), ("pg_pos", {}), ("tied_lora", {}), ("vera", {}),
                       ("adalora", {})]
    full = table.BUDGETS["full"]
    assert full.epochs >= 1 and full.max_train_samples and full.max_length == 128
