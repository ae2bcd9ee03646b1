"""Compile every kernel for a CUDA target on a machine without a GPU.

The interpreter checks the arithmetic but not what only the real compiler enforces
(tl.dot's minimum block sizes and dtype rules, constexpr branches, PTX assembly). This
runs the real compiler (to cubin, with the ptxas bundled in the triton wheel) for each
kernel, flag combination and dtype, with the CUDA autotune configs:

    env -u TRITON_INTERPRET python -m peftkern.triton_kernels.aot_check [--quick] [--arch 90 80]

``--quick`` compiles one config per kernel (the first, the largest) in bf16 for the first
arch. Exit status 1 if anything fails to compile; shared memory per kernel is printed
(the autotuner skips configs that do not fit the device).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Dict, List, Tuple

ACC_POINTERS = {"f_ptr", "gt_ptr", "du_ptr", "dh_ptr", "da_ptr", "z_ptr"}  # fp32 scratch (fp64 for fp64)

# (module, kernel attribute, flag combinations)
KERNELS: List[Tuple[str, str, List[Dict[str, object]]]] = [
    ("adapter_forward", "_GEMM", [
        dict(HAS_BASE=True, HAS_BIAS=True, HAS_LOWRANK=True, FUSE_SHRINK=False, STORE_H=False, BLOCK_R=16),
        dict(HAS_BASE=True, HAS_BIAS=True, HAS_LOWRANK=True, FUSE_SHRINK=True, STORE_H=True, BLOCK_R=32),
        dict(HAS_BASE=False, HAS_BIAS=False, HAS_LOWRANK=True, FUSE_SHRINK=False, STORE_H=False, BLOCK_R=16),
        dict(HAS_BASE=True, HAS_BIAS=False, HAS_LOWRANK=False, FUSE_SHRINK=False, STORE_H=False, BLOCK_R=16)]),
    ("shrink", "_SHRINK", [dict(HAS_U=True, STORE_H=True, BLOCK_R=16)]),
    ("adapter_backward", "_DY_PASS", [dict(HAS_U=True, COMPUTE_DH=True, COMPUTE_GT=True, COMPUTE_DU=True, BLOCK_R=32),
                                      dict(HAS_U=False, COMPUTE_DH=True, COMPUTE_GT=False, COMPUTE_DU=False,
                                           BLOCK_R=16)]),
    ("adapter_backward", "_GRAD_A", [dict(BLOCK_R=16)]),
    ("hypernet", "_FWD", [dict(STORE_Z=True)]),
    ("hypernet", "_BWD", [dict(COMPUTE_DW2=True, COMPUTE_DB2=True, COMPUTE_DH=True)]),
]


def _signature(fn, constexprs: Dict[str, object], io: str, acc: str) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (acc if name in ACC_POINTERS else io)
        else:
            sig[name] = "i32"
    return sig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--arch", type=int, nargs="*", default=[90, 80])
    p.add_argument("--dtypes", nargs="*", default=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tl_types = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}
    archs = args.arch[:1] if args.quick else args.arch
    dtypes = ["bf16"] if args.quick else args.dtypes
    failures = 0
    for module, attr, flag_sets in KERNELS:
        kernel = getattr(importlib.import_module(f"peftkern.triton_kernels.{module}"), attr)
        configs = kernel.tuned.configs[:1] if args.quick else kernel.tuned.configs
        for io in dtypes:
            acc = "fp64" if io == "fp64" else "fp32"
            dot = {"DOT_DT": tl_types[io], "ACC_DT": tl_types[acc], "PREC": "ieee"}
            for arch in archs:
                for flags in flag_sets:
                    for cfg in configs:
                        constexprs = {**flags, **cfg.kwargs, **dot}
                        src = ASTSource(kernel.plain, _signature(kernel.plain, constexprs, io, acc), constexprs)
                        what = f"{kernel.name} {io} sm{arch} {cfg.kwargs} {flags}"
                        try:
                            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                                      options={"num_warps": cfg.num_warps,
                                                               "num_stages": cfg.num_stages})
                            print(f"ok   {what} shared={compiled.metadata.shared}")
                        except Exception as exc:  # report every failure, then fail at the end
                            failures += 1
                            print(f"FAIL {what}: {type(exc).__name__}: {exc}")
    print(f"aot_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
