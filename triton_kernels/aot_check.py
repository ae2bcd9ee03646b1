"""Compile every kernel for a CUDA target on a machine without a GPU, and check that it fits.

The interpreter checks the arithmetic but not what only the real compiler enforces
(tl.dot's minimum block sizes and dtype rules, constexpr branches, PTX assembly) nor what
the hardware allows. This runs the real compiler (to cubin, with the ptxas bundled in the
triton wheel) for each kernel, flag combination and dtype, with the CUDA autotune configs,
and checks with ``_launch.fitting`` (the pruner the autotuner runs on a GPU) that for
every one of them at least one config fits the shared memory of the target (H200/H100:
232,448 bytes per block) up to the largest rank the kernels take (``MAX_RANK``):

    env -u TRITON_INTERPRET python -m peftkern_triton.aot_check [--quick] [--arch 90 80]

``--quick`` compiles bf16 for the first arch only, and per kernel only the flag set with
the largest rank block (where shared memory is tightest). Exit status 1 if anything fails to
compile or no config fits; each config's shared memory is printed, marked ``pruned`` when
it exceeds the limit (the autotuner never launches it).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Dict, List, Tuple

ACC_POINTERS = {"f_ptr", "gt_ptr", "du_ptr", "dh_ptr", "da_ptr", "z_ptr", "dg_ptr"}  # fp32 scratch (fp64 for fp64)
# a bitsandbytes 4-bit weight's state (weight4bit.py): packed codes, absmax (8-bit when nested), code books
QUANT_POINTERS = {"q_ptr": "u8", "qcode_ptr": "fp32", "qabs2_ptr": "fp32", "qcode2_ptr": "fp32", "qoff_ptr": "fp32"}
FLOAT_ARGS = {"p", "inv"}
INT64_ARGS = {"seed"}
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in): H100/H200, A100

# (module, kernel attribute, flag combinations); BLOCK_R 128 is the largest rank the kernels take
KERNELS: List[Tuple[str, str, List[Dict[str, object]]]] = [
    # the 4-bit block sizes are compile-time constants: 1 for a dense W0 (what the launcher passes), and
    # bitsandbytes' defaults (64 per absmax, 256 per nested absmax) for a 4-bit one
    ("adapter_forward", "_GEMM", [{**dense, **flags} for dense in [dict(W_4BIT=False, NESTED=False, Q_BLOCK=1,
                                                                         Q_BLOCK2=1)] for flags in [
        dict(HAS_BASE=True, HAS_BIAS=True, HAS_LOWRANK=True, FUSE_SHRINK=False, STORE_H=False, MASK_INPUT=False,
             MASK_LOWRANK=False, BLOCK_R=16),
        dict(HAS_BASE=True, HAS_BIAS=True, HAS_LOWRANK=True, FUSE_SHRINK=True, STORE_H=True, MASK_INPUT=True,
             MASK_LOWRANK=False, BLOCK_R=32),
        dict(HAS_BASE=True, HAS_BIAS=False, HAS_LOWRANK=True, FUSE_SHRINK=False, STORE_H=False, MASK_INPUT=False,
             MASK_LOWRANK=True, BLOCK_R=128),
        dict(HAS_BASE=False, HAS_BIAS=False, HAS_LOWRANK=True, FUSE_SHRINK=False, STORE_H=False, MASK_INPUT=False,
             MASK_LOWRANK=True, BLOCK_R=16),
        dict(HAS_BASE=True, HAS_BIAS=False, HAS_LOWRANK=False, FUSE_SHRINK=False, STORE_H=False, MASK_INPUT=False,
             MASK_LOWRANK=False, BLOCK_R=16)]] + [  # QLoRA fused: the 4-bit W0's forward and its dx
        dict(W_4BIT=True, NESTED=True, Q_BLOCK=64, Q_BLOCK2=256, HAS_BASE=True, HAS_BIAS=False, HAS_LOWRANK=True,
             FUSE_SHRINK=True, STORE_H=True, MASK_INPUT=True, MASK_LOWRANK=False, BLOCK_R=128),
        dict(W_4BIT=True, NESTED=False, Q_BLOCK=64, Q_BLOCK2=256, HAS_BASE=True, HAS_BIAS=False, HAS_LOWRANK=True,
             FUSE_SHRINK=False, STORE_H=False, MASK_INPUT=False, MASK_LOWRANK=True, BLOCK_R=16),
        # an fp32-quantized W0 in a bf16 compute dtype (the base product rounded to it), with a bias
        dict(W_4BIT=True, NESTED=True, Q_BLOCK=64, Q_BLOCK2=256, HAS_BASE=True, HAS_BIAS=True, HAS_LOWRANK=True,
             FUSE_SHRINK=False, STORE_H=False, MASK_INPUT=False, MASK_LOWRANK=False, BLOCK_R=16,
             W_DT="fp32", BASE_DT="bf16")]),
    ("shrink", "_SHRINK", [dict(HAS_U=True, STORE_H=True, DROPOUT=True, BLOCK_R=16),
                           dict(HAS_U=False, STORE_H=True, DROPOUT=False, BLOCK_R=128)]),
    ("adapter_backward", "_DY_PASS", [dict(HAS_U=True, COMPUTE_DH=True, COMPUTE_GT=True, COMPUTE_DU=True, BLOCK_R=32),
                                      dict(HAS_U=False, COMPUTE_DH=True, COMPUTE_GT=False, COMPUTE_DU=False,
                                           BLOCK_R=16),
                                      dict(HAS_U=True, COMPUTE_DH=True, COMPUTE_GT=True, COMPUTE_DU=True,
                                           BLOCK_R=128)]),
    ("adapter_backward", "_GRAD_A", [dict(DROPOUT=True, BLOCK_R=16), dict(DROPOUT=False, BLOCK_R=128)]),
    ("hypernet", "_FWD", [dict(STORE_Z=True)]),
    ("hypernet", "_BWD", [dict(COMPUTE_DW2=True, COMPUTE_DB2=True, COMPUTE_DH=True)]),
    ("dora", "_SCALE", [dict(HAS_BIAS=True)]),
    ("dora", "_SCALE_BWD", [dict(NEED_G=True, NEED_DZ=True, SUB_BIAS=True), dict(NEED_G=True, NEED_DZ=False, SUB_BIAS=True)]),
]


def signature(kernel, io: str, acc: str, flags: Dict[str, object]) -> Dict[str, str]:
    """Argument types by the kernels' naming convention (pointers, the dropout seed and rates, int sizes)."""
    sig = {}
    for name in kernel.plain.arg_names:
        if name in kernel.constexpr_names:
            continue
        if name == "qabs_ptr":
            sig[name] = "*u8" if flags.get("NESTED") else "*fp32"
        elif name in QUANT_POINTERS:
            sig[name] = "*" + QUANT_POINTERS[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + (acc if name in ACC_POINTERS else io)
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in INT64_ARGS:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def base_dtypes(flags: Dict[str, object], io: str) -> Dict[str, object]:
    """The 4-bit base product's dtype constexprs (adapter_forward.py): the flags' W_DT / BASE_DT names, else x's dtype."""
    import triton.language as tl

    tl_types = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}
    w, base = tl_types[flags.get("W_DT", io)], tl_types[flags.get("BASE_DT", io)]
    return {"W_DT": w, "BASE_DT": base, "BASE_DOT_DT": base, "BASE_PREC": "ieee"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--arch", type=int, nargs="*", default=[90, 80])
    p.add_argument("--dtypes", nargs="*", default=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from . import _launch

    tl_types = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}
    archs = args.arch[:1] if args.quick else args.arch
    dtypes = ["bf16"] if args.quick else args.dtypes
    failures = 0
    for module, attr, flag_sets in KERNELS:
        kernel = getattr(importlib.import_module(f"peftkern_triton.{module}"), attr)
        if args.quick:  # the largest rank block (the tightest shared memory), of each weight format
            flag_sets = [max((f for f in flag_sets if f.get("W_4BIT") == w4), key=lambda f: f.get("BLOCK_R", 0))
                         for w4 in dict.fromkeys(f.get("W_4BIT") for f in flag_sets)]
        configs = kernel.tuned.configs
        for io in dtypes:
            acc = "fp64" if io == "fp64" else "fp32"
            dot = {"DOT_DT": tl_types[io], "ACC_DT": tl_types[acc], "PREC": "ieee"}
            for arch in archs:
                target, limit = GPUTarget("cuda", arch, 32), SHARED_LIMIT.get(arch, 101376)
                for flags in flag_sets:
                    sig = signature(kernel, io, acc, flags)
                    constexprs = {k: v for k, v in {**flags, **base_dtypes(flags, io), **dot}.items()
                                  if k in kernel.constexpr_names}
                    what = f"{kernel.name} {io} sm{arch} {flags}"
                    try:
                        for cfg in configs:
                            need = _launch.shared_bytes(kernel, cfg, sig, constexprs, target)
                            mark = "ok    " if need <= limit else "pruned"
                            print(f"{mark} {what} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages} "
                                  f"shared={need}")
                        _launch.fitting(kernel, configs, sig, constexprs, target, limit)
                        print(f"fits   {what}")
                    except Exception as exc:  # report every failure, then fail at the end
                        failures += 1
                        print(f"FAIL   {what}: {type(exc).__name__}: {exc}")
    print(f"aot_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
