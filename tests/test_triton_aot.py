"""The kernels compile for a real CUDA target (sm_90) even on a machine without a GPU.

The interpreter tests check the arithmetic; this catches what only the compiler enforces
(tl.dot's minimum block sizes and operand dtypes, constexpr branches, PTX assembly). It
runs in a subprocess because the interpreter, once on, replaces the compiler in-process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_available() -> bool:
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return nvidia.exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton wheel without the bundled ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "peftkern.triton_kernels.aot_check", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    from peftkern.triton_kernels.aot_check import KERNELS

    compiled = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == sum(len(flag_sets) for _, _, flag_sets in KERNELS), proc.stdout
    assert "0 failure(s)" in proc.stdout
