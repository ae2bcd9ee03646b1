"""Smoke tests of the benchmark tooling that the pytest-benchmark suites do not cover:
memory_profile.py's LEFT table and memory child in-process on the tiny shape, targets.py's
PASS / MISS logic on results files written here, and bench_dora_route.py's route switch."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH)

import bench_dora_route  # noqa: E402
import memory_profile  # noqa: E402
import targets  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # memory_profile.parse pins torch's threads: give them back
    yield
    torch.set_num_threads(n)


def test_left_table_quick_has_every_paper_row(tmp_path):
    args = memory_profile.parse(["--quick", "--table", "left", "--reps", "1", "--out-dir", str(tmp_path)])
    rows = memory_profile.left_table(args)
    assert [r["provider"] for r in rows] == list(memory_profile.PAPER_TABLE13_R8)
    lora = next(r for r in rows if r["provider"] == "lora")
    assert lora["relative_to_lora"] == 1.0
    pg = next(r for r in rows if r["provider"] == "pg_pos")
    assert pg["paper_relative_to_lora"] == round(0.92 / 0.76, 4)
    assert all(r["ms_per_step"] > 0 for r in rows)


def test_memory_child_reports_a_peak_at_least_the_rss_before(capsys):
    args = memory_profile.parse(["--quick", "--child", "peft:lora:0", "--memory-steps", "1"])
    memory_profile.run_child(args)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["peak_mb"] >= out["before_mb"] > 0


def _suite_json(path, medians):
    benchmarks = [{"extra_info": {"group": g, "provider": p}, "stats": {"median": m}}
                  for g, row in medians.items() for p, m in row.items()]
    path.write_text(json.dumps({"benchmarks": benchmarks}))


@pytest.mark.parametrize("peft_overhead,expect", [(0.2, True), (0.1, False)])
def test_targets_overhead_pass_and_miss(tmp_path, peft_overhead, expect):
    # ours: 0.05 s over a 1 s floor; PEFT: peft_overhead over it -> ratio 0.25 (PASS) or 0.5+ (MISS)
    _suite_json(tmp_path / "bench_suite_x.json",
                {"lora": {"floor": 1.0, "lora": 1.05 + (0.0 if expect else 0.01), "peft_lora": 1.0 + peft_overhead},
                 "pg_vs_lora": {"lora": 1.0, "pg_pos": 1.02}, "hyper_adalora": {"adalora": 1.0, "hyper_adalora": 1.01}})
    checks = {c[0]: c for c in targets.step_checks(str(tmp_path / "bench_suite_x.json"))}
    assert checks["lora: overhead <= 0.5x PEFT's"][3] is expect
    assert checks["vera: overhead <= 0.5x PEFT's"][3] is None  # providers missing: no data, not a pass
    assert checks["pg_pos A_H B_L <= 1.03x lora per step"][3] is True
    assert checks["hyper_adalora latency <= adalora's"][3] is False


def test_targets_missing_files_are_no_data(tmp_path):
    checks = targets.step_checks(str(tmp_path / "nope.json")) + targets.csv_checks(str(tmp_path), "")
    assert len(checks) == 4 and all(c[3] is None for c in checks)
    assert "NO DATA" in targets.render(checks)


def test_the_dora_route_bench_times_every_route_and_restores_the_rule():
    from peftkern.ops import functions

    before = functions.FOLD_MIN_ROWS_PER_FEATURE
    medians = bench_dora_route.measure(16, 24, 64, 4, 2)
    assert set(medians) == {"lora", "scaled", "folded"} and all(t > 0 for t in medians.values())
    assert functions.FOLD_MIN_ROWS_PER_FEATURE == before
