"""The kernels compile for a real CUDA target (sm_90) on a machine without a GPU, and the
autotuner's resource pruning keeps, for every kernel, a config that fits an H200.

The interpreter tests check the arithmetic; this catches what only the compiler and the
hardware enforce (tl.dot's minimum block sizes and operand dtypes, constexpr branches,
PTX assembly, shared memory per block). It runs in a subprocess because the interpreter,
once on, replaces the compiler in-process.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return nvidia.exists()


def _compiler(code_or_args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, *code_or_args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="triton wheel without the bundled ptxas")


@needs_ptxas
def test_every_kernel_compiles_for_sm90_and_a_config_fits_at_the_largest_rank():
    proc = _compiler(["-m", "peftkern_triton.aot_check", "--quick"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    from peftkern_triton.aot_check import KERNELS

    fits = [line for line in proc.stdout.splitlines() if line.startswith("fits ")]
    formats = sum(len({f.get("W_4BIT") for f in flag_sets}) for _, _, flag_sets in KERNELS)  # dense, 4-bit
    assert len(fits) == formats, proc.stdout
    assert any("W_4BIT': True" in line for line in fits)
    assert "0 failure(s)" in proc.stdout


@needs_ptxas
def test_pruning_drops_what_does_not_fit_rank_256_as_the_first_gpu_run_crashed():
    """dy_pass at BLOCK_R = 256 (VeRA r = 256 on the first GPU run: 'Required: 344064, Hardware
    limit: 232448'): the compiler's own figure puts configs over the H200 limit, and ``fitting``
    removes exactly those. The kernels now refuse r > MAX_RANK before launching at all."""
    code = textwrap.dedent("""
        from triton.backends.compiler import GPUTarget
        from peftkern_triton import _launch, aot_check
        from peftkern_triton.adapter_backward import _DY_PASS
        import triton.language as tl
        sig = aot_check.signature(_DY_PASS, "bf16", "fp32", {})
        flags = dict(HAS_U=True, COMPUTE_DH=True, COMPUTE_GT=True, COMPUTE_DU=True, BLOCK_R=256,
                     DOT_DT=tl.bfloat16, ACC_DT=tl.float32, PREC="ieee")
        target, limit = GPUTarget("cuda", 90, 32), 232448
        needs = [_launch.shared_bytes(_DY_PASS, c, sig, flags, target) for c in _DY_PASS.tuned.configs]
        try:
            kept = _launch.fitting(_DY_PASS, _DY_PASS.tuned.configs, sig, flags, target, limit)
        except ValueError:
            kept = []
        print("NEEDS", needs)
        print("KEPT", [_DY_PASS.tuned.configs.index(c) for c in kept])
        try:
            _launch.block_r(256)
        except ValueError as exc:
            print("REFUSED", exc)
    """)
    proc = _compiler(["-c", code])
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in
                 ("NEEDS", "KEPT", "REFUSED"))
    needs, kept = eval(lines["NEEDS"]), eval(lines["KEPT"])
    assert max(needs) > 232448  # the crash: configs that need more than the device has
    assert kept == [i for i, n in enumerate(needs) if n <= 232448]
    assert "rank <= 128" in lines["REFUSED"]


@needs_ptxas
def test_the_4bit_gemm_compiles_without_64_bit_divisions():
    """Each 4-bit weight element needs its absmax block (and, nested, that block's block): with the block
    sizes as run-time ints those were int64 divisions in the K-loop (384 div/rem.s64 in the sm_90 PTX),
    a long instruction sequence each on a GPU. As compile-time constants they are shifts."""
    code = textwrap.dedent("""
        import re
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from peftkern_triton import aot_check
        from peftkern_triton.adapter_forward import _GEMM
        flags = dict(W_4BIT=True, NESTED=True, Q_BLOCK=64, Q_BLOCK2=256, HAS_BASE=True, HAS_BIAS=False,
                     HAS_LOWRANK=True, FUSE_SHRINK=False, STORE_H=False, MASK_INPUT=False, MASK_LOWRANK=False,
                     BLOCK_R=16)
        sig = aot_check.signature(_GEMM, "bf16", "fp32", flags)
        cfg = _GEMM.tuned.configs[0]
        values = {**flags, **aot_check.base_dtypes(flags, "bf16"), "DOT_DT": tl.bfloat16, "ACC_DT": tl.float32,
                  "PREC": "ieee", **cfg.kwargs}
        full = {n: ("constexpr" if n in values else sig[n]) for n in _GEMM.plain.arg_names}
        ptx = triton.compile(ASTSource(_GEMM.plain, full, values), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm["ptx"]
        print("DIV64", len(re.findall(r"\\b(?:div|rem)\\.[su]64", ptx)))
    """)
    proc = _compiler(["-c", code])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DIV64 0" in proc.stdout, proc.stdout
