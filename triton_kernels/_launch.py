"""What every launcher shares: dot/accumulator dtypes, the autotune-or-fixed-config
choice, block sizes for the rank dimension, and the module-level launch counter.

Two execution modes:
  * CUDA: kernels are ``@triton.autotune``-d over a handful of configs; dots run on the
    input dtype (bf16/fp16 tensor cores) and accumulate in fp32.
  * CPU under ``TRITON_INTERPRET=1`` (the test suite): autotune with several configs
    crashes there, so one fixed small config runs; and the interpreter's bf16/fp16
    ``tl.dot`` is wrong, so tiles are cast to fp32 (fp64 stays fp64) before every dot.
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Dict, Optional, Sequence

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}

# tl.dot needs every block dimension >= 16 on CUDA; the rank r (often 1..8) is padded up to it.
MIN_DOT = 16

_LAUNCHES: "collections.Counter[str]" = collections.Counter()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def count_launch(name: str) -> None:
    _LAUNCHES[name] += 1


def launch_counts() -> Dict[str, int]:
    """Kernel launches since the last reset, by kernel name (host-side counter, no sync)."""
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()


def check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: {what} has dtype {t.dtype}; supported: "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")


def check_same_dtype(name: str, first: torch.Tensor, **others) -> None:
    """The kernels read every operand in ``first``'s dtype; a mismatch is a caller bug, named here."""
    check_dtype(first, name)
    bad = {n: t.dtype for n, t in others.items() if t is not None and t.dtype != first.dtype}
    if bad:
        raise TypeError(f"triton backend: every operand must have {name}'s dtype {first.dtype}; got "
                        + ", ".join(f"{n}: {dt}" for n, dt in bad.items()))


def vec(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """1-D operands (bias, u, b1, b2) are read with unit stride: a copy of a strided
    vector is negligible next to the GEMMs, unlike the big operands, which keep strides."""
    return None if t is None else t.contiguous()


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / scratch dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_meta(dtype: torch.dtype) -> Dict[str, object]:
    """The DOT_DT / ACC_DT / PREC constexprs for tiles whose storage dtype is ``dtype``."""
    acc = _TL_DTYPE[acc_torch_dtype(dtype)]
    dot = acc if interpreting() else _TL_DTYPE[dtype]
    # fp32 inputs: follow torch's own matmul setting, so results match cuBLAS's choice.
    tf32 = dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_DT": dot, "ACC_DT": acc, "PREC": "tf32" if tf32 else "ieee"}


def block_r(r: int) -> int:
    """Padded rank block: the whole rank lives in one tile (registers grow with r)."""
    return max(MIN_DOT, triton.next_power_of_2(r))


def m_bucket(M: int) -> int:
    """Autotune key for the token dimension: power-of-two buckets, so varying sequence
    lengths do not re-tune on every new M."""
    return triton.next_power_of_2(max(M, 1))


class Kernel:
    """A jit kernel that is autotuned on CUDA and runs one fixed config under the interpreter.

    ``grid`` is always a function of the meta-parameters (as for ``triton.autotune``), so
    launchers do not care which path runs.
    """

    def __init__(self, fn, name: str, configs: Sequence[triton.Config], key: Sequence[str],
                 fallback: Dict[str, int], reset_to_zero: Optional[Sequence[str]] = None):
        self.name = name
        self.plain = fn
        self.fallback = dict(fallback)
        self.tuned = triton.autotune(list(configs), key=list(key), reset_to_zero=list(reset_to_zero or ()) or None)(fn)

    def __call__(self, grid: Callable[[Dict[str, int]], tuple], *args, **kwargs) -> None:
        count_launch(self.name)
        if interpreting():
            self.plain[grid(self.fallback)](*args, **kwargs, **self.fallback)
        else:
            self.tuned[grid](*args, **kwargs)


def configs(rows: Sequence[tuple], names: Sequence[str]) -> list:
    """``triton.Config`` list from compact rows ``(*block sizes, num_warps, num_stages)``."""
    out = []
    for row in rows:
        *blocks, warps, stages = row
        out.append(triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages))
    return out
