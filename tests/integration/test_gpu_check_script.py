"""benchmarks/gpu_check.sh, the one command a GPU machine runs, works: its dry run (anywhere)
collects the GPU tests and runs the step benchmark's --quick mode (with a profiled step), and
writes its files."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_writes_the_summary_and_the_benchmark_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "PEFTKERN_COMMIT": "test"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run (no measurement)" in summary and "commit: test" in summary
    table = (tmp_path / "gpu_step.md").read_text()
    assert "| floor |" in table and "| pk_lora_qv |" in table and "| peft_lora_qv |" in table
    assert "error" not in table and "host ms" in table
    profile = (tmp_path / "profile_pk_lora_qv.txt").read_text()  # one profiled step: the ops by their time
    assert "one step of pk_lora_qv" in profile and "Self CPU" in profile
    assert "tests collected" in (tmp_path / "gpu_tests.log").read_text()
