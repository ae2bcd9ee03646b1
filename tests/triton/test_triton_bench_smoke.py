"""Keep benchmarks/bench_triton_layer.py from rotting: its --smoke mode runs every provider
on one tiny shape on the CPU (Triton under the interpreter) and checks that they agree."""
import csv
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_triton_layer.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_triton_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_writes_a_table_with_every_provider(tmp_path):
    from peftkern.ops.backends import triton as tk

    bench = _load()
    before = tk.current_forward_variant()
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert tk.current_forward_variant() == before  # the run leaves the process as it found it
    (md,) = tmp_path.glob("*.md")
    (table,) = tmp_path.glob("*.csv")
    text = md.read_text()
    assert "device: cpu-interpreter" in text and "commit:" in text
    with open(table) as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    expected = {"cublas_frozen", "triton_prior_shrink", "triton_in_loop", "peft_lora", "unsloth_addmm",
                "torch_backend"}
    assert {r["provider"] for r in rows} == expected
    assert {r["mode"] for r in rows} == set(bench.MODES)
    assert all(float(r["ms"]) > 0 for r in rows)
