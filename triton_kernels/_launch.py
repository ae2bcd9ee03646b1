"""What every launcher shares: dtypes, block sizes for the rank dimension, strides, the
dropout mask, and ``Launcher``, which autotunes safely.

Two execution modes:
  * CUDA: kernels are ``@triton.autotune``-d over a handful of configs; dots run on the
    input dtype (bf16/fp16 tensor cores) and accumulate in fp32.
  * CPU under ``TRITON_INTERPRET=1`` (the test suite): autotune with several configs
    crashes there, so one fixed small config runs; and the interpreter's bf16/fp16
    ``tl.dot`` is wrong, so tiles are cast to fp32 (fp64 stays fp64) before every dot.
    tests/test_triton_autotune.py runs the autotuned path too, with a stub benchmarker.

Three faults of GPU runs are excluded here by construction, not by care:

* **Aliased reset arguments.** ``triton.autotune(reset_to_zero=...)`` zeroes the named
  arguments before every config it benchmarks and before the chosen one runs. A launcher
  that passed live data (a factor) as a stand-in for an unused reset argument had it
  zeroed: wrong gradients on the first call of every new autotune key. ``Launcher``
  refuses, at every launch, a reset argument that overlaps any other argument, and
  launchers pass ``unused(...)``, a fresh scratch tensor, for reset arguments they do
  not need.
* **In-place outputs benchmarked repeatedly.** The autotuner runs every config on the
  same arguments, so a kernel that writes over its input (DoRA's column scale: y = g⊙z + b
  over z) applied itself once per config: the second GPU run (2026-12-04) got a fixed
  point b/(1 − g) in every row, and infinities where g > 1. ``Launcher`` takes
  ``restore_value`` (the autotuner then saves those arguments before benchmarking and
  restores them after each config) and every in-place launcher names its output there.
* **Configs that do not fit the device.** ``Launcher`` prunes, before autotuning, every
  config whose compiled shared memory exceeds the device's per-block limit
  (``resources``: the real compiler's figure for that config, flags and dtypes, cached).
  Registers cannot overflow a block: ptxas caps a thread at 255 registers and no config
  has more than 8 warps (255 × 256 < 65,536). Ranks above ``MAX_RANK`` do not reach the
  kernels at all (peftkern's registry runs them on its torch backend and says so).
"""
from __future__ import annotations

import collections
import functools
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
_SIG_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32"}

# tl.dot needs every block dimension >= 16 on CUDA; the rank r (often 1..8) is padded up to it.
MIN_DOT = 16
# The whole rank lives in one tile; above this the backend uses the torch kernels (see kernels.py).
MAX_RANK = 128
MAX_WARPS = 8

_LAUNCHES: "collections.Counter[str]" = collections.Counter()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def count_launch(name: str) -> None:
    _LAUNCHES[name] += 1


def launch_counts() -> Dict[str, int]:
    """Kernel launches since the last reset, by kernel name."""
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()


def check_same_dtype(name: str, first: torch.Tensor, **others) -> None:
    """The kernels read every operand in ``first``'s dtype; a mismatch is a caller bug, named here."""
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: {name} has dtype {first.dtype}; supported: "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    bad = {n: t.dtype for n, t in others.items() if t is not None and t.dtype != first.dtype}
    if bad:
        raise TypeError(f"triton backend: every operand must have {name}'s dtype {first.dtype}; got "
                        + ", ".join(f"{n}: {dt}" for n, dt in bad.items()))


def vec(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """1-D operands (bias, u, b1, b2) are read with unit stride: a copy of a strided
    vector is negligible next to the GEMMs, unlike the big operands, which keep strides."""
    return None if t is None else t.contiguous()


def strides(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(stride 0, stride 1) of a 2-D operand, (0, 0) for an absent one (its pointer is never read)."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def unused(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A fresh one-element tensor for a pointer argument the kernel will not touch. Never an alias
    of live data, so it is safe where the autotuner may zero or restore the argument."""
    return torch.empty(1, device=like.device, dtype=dtype or like.dtype)


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / scratch dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """Triton's name for a supported torch float dtype (ValueError naming the choices otherwise)."""
    if dtype not in _TL_DTYPE:
        raise ValueError(f"the Triton kernels take {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {dtype}")
    return _TL_DTYPE[dtype]


def dot_meta(dtype: torch.dtype) -> Dict[str, object]:
    """The DOT_DT / ACC_DT / PREC constexprs for tiles whose storage dtype is ``dtype``."""
    acc = _TL_DTYPE[acc_torch_dtype(dtype)]
    dot = acc if interpreting() else _TL_DTYPE[dtype]
    # fp32 inputs: follow torch's own matmul setting, so results match cuBLAS's choice.
    tf32 = dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_DT": dot, "ACC_DT": acc, "PREC": "tf32" if tf32 else "ieee"}


def block_r(r: int) -> int:
    """Padded rank block: the whole rank lives in one tile (registers grow with r)."""
    if r > MAX_RANK:
        raise ValueError(f"the Triton kernels take rank <= {MAX_RANK}, got {r} (peftkern runs larger ranks on its torch "
                         "backend)")
    return max(MIN_DOT, triton.next_power_of_2(r))


def m_bucket(M: int) -> int:
    """Autotune key for the token dimension: power-of-two buckets, so varying sequence
    lengths do not re-tune on every new M."""
    return triton.next_power_of_2(max(M, 1))


# Triton's interpreter truncates a conversion to bf16 where a GPU rounds to nearest even (as torch does):
# there ``rounded`` rounds by the fp32 bits, so that the CPU tests check the GPU's rounding
_BF16_BY_BITS = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def rounded(v, DT: tl.constexpr):
    """v in dtype DT, rounded to nearest even as torch rounds; a no-op when v is in DT already.
    Under the interpreter a conversion to bf16 goes by the bits (``_BF16_BY_BITS``); NaN stays NaN."""
    if v.dtype == DT:
        return v
    elif DT == tl.bfloat16 and _BF16_BY_BITS:
        f = v.to(tl.float32)  # exact from fp16
        bits = f.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(f != f, f, bits.to(tl.float32, bitcast=True)).to(DT)
    else:
        return v.to(DT)


@triton.jit
def dropout_keep(seed, rows64, cols, K, p):
    """[BLOCK_M, BLOCK_K] bool: element (m, k) of the adapter's [M, K] input is kept.

    Philox (tl.rand) of (seed, m·K + k): a pure function of the seed and the position, so
    the forward, the dA pass and the dx epilogue draw the same mask without storing it."""
    return tl.rand(seed, rows64[:, None] * K + cols[None, :]) >= p


# --- resources of a config, from the real compiler ----------------------------------------------

def _sig_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _SIG_DTYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if not -2 ** 31 <= value < 2 ** 31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def signature_of(kernel: "Launcher", named_args: Dict[str, object]) -> Dict[str, str]:
    """The compiler signature of a launch: each non-constexpr argument's type, from its value."""
    return {name: _sig_of(named_args[name]) for name in kernel.plain.arg_names if name not in kernel.constexpr_names}


@functools.lru_cache(maxsize=None)
def _compiled_shared(fn, signature: Tuple[Tuple[str, str], ...], constexprs: Tuple[Tuple[str, object], ...],
                     num_warps: int, num_stages: int, target) -> int:
    from triton.compiler import ASTSource

    src = ASTSource(fn, dict(signature), dict(constexprs))
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    return int(compiled.metadata.shared)


def shared_bytes(kernel: "Launcher", config: triton.Config, signature: Dict[str, str], constexprs: Dict[str, object],
                 target) -> int:
    """Shared memory in bytes that ``config`` of ``kernel`` needs with these argument types and constexpr
    flags on ``target`` (a triton GPUTarget), as the compiler reports it (cached)."""
    values = {**constexprs, **config.kwargs}
    full = {name: ("constexpr" if name in values else signature[name]) for name in kernel.plain.arg_names}
    frozen = tuple(sorted(values.items(), key=lambda kv: kv[0]))
    return _compiled_shared(kernel.plain, tuple(full.items()), frozen, config.num_warps, config.num_stages, target)


def shared_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on ``device`` (the opt-in maximum)."""
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        from triton.runtime import driver

        limit = driver.active.utils.get_device_properties(torch.device(device).index or 0)["max_shared_mem"]
    return int(limit)


def fitting(kernel: "Launcher", configs: Sequence[triton.Config], signature: Dict[str, str],
            constexprs: Dict[str, object], target, limit: int) -> list:
    """The configs whose compiled shared memory fits ``limit``; ValueError naming the smallest need if none does."""
    needs = [(shared_bytes(kernel, c, signature, constexprs, target), c) for c in configs]
    kept = [c for need, c in needs if need <= limit]
    if not kept:
        smallest = min(needs, key=lambda t: t[0])
        raise ValueError(f"{kernel.name}: no config fits {limit} bytes of shared memory (the smallest, "
                         f"{smallest[1]}, needs {smallest[0]})")
    return kept


class Launcher:
    """A jit kernel that is autotuned on CUDA and runs one fixed config under the interpreter.

    ``grid`` is always a function of the meta-parameters (as for ``triton.autotune``), so
    launchers do not care which path runs. ``reset_to_zero`` names accumulator arguments
    (atomics); ``restore_value`` names arguments the kernel writes over in place (restored
    after each benchmarked config); see the module docstring for the guarantees this class adds.
    """

    def __init__(self, fn, name: str, configs: Sequence[triton.Config], key: Sequence[str],
                 fallback: Dict[str, int], reset_to_zero: Optional[Sequence[str]] = None,
                 restore_value: Optional[Sequence[str]] = None):
        self.name = name
        self.plain = fn
        self.fallback = dict(fallback)
        self.reset_to_zero = tuple(reset_to_zero or ())
        self.restore_value = tuple(restore_value or ())
        self.constexpr_names = _constexpr_names(fn)
        bad = [c for c in configs if c.num_warps > MAX_WARPS]
        if bad:
            raise ValueError(f"{name}: configs with more than {MAX_WARPS} warps could exceed a block's registers: {bad}")
        self.tuned = triton.autotune(list(configs), key=list(key), reset_to_zero=list(self.reset_to_zero) or None,
                                     restore_value=list(self.restore_value) or None,
                                     prune_configs_by={"early_config_prune": self._prune})(fn)

    def _prune(self, configs, named_args, **kwargs):
        from triton.runtime import driver

        args = {**named_args, **kwargs}
        device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
        constexprs = {k: v for k, v in args.items() if k in self.constexpr_names}
        try:
            sig = signature_of(self, args)
            target, limit = driver.active.get_current_target(), shared_limit(device)
            needs = [(shared_bytes(self, c, sig, constexprs, target), c) for c in configs]
        except Exception as exc:  # the measurement itself failed: say so, and let the autotuner skip misfits
            _warn_once(self.name, f"peftkern_triton: could not compute the shared memory of {self.name}'s configs "
                                  f"({type(exc).__name__}: {exc}); autotuning all of them")
            return configs
        kept = [c for need, c in needs if need <= limit]
        if not kept:
            raise ValueError(f"{self.name}: no config fits {limit} bytes of shared memory (needs: "
                             f"{sorted(n for n, _ in needs)[:3]}...)")
        return kept

    def check_aliases(self, args: Sequence[object]) -> None:
        """Raise if an argument the autotuner may zero overlaps any other tensor argument."""
        if not self.reset_to_zero:
            return
        named = dict(zip(self.plain.arg_names, args))
        spans = {n: _span(t) for n, t in named.items() if isinstance(t, torch.Tensor)}
        for name in self.reset_to_zero:
            lo, hi = spans[name]
            for other, (olo, ohi) in spans.items():
                if other != name and lo < ohi and olo < hi:
                    raise RuntimeError(f"{self.name}: argument {name!r}, which autotuning zeroes, overlaps "
                                       f"argument {other!r}; pass _launch.unused(...) for an unused accumulator")

    def __call__(self, grid: Callable[[Dict[str, int]], tuple], *args, **kwargs) -> None:
        count_launch(self.name)
        self.check_aliases(args)
        if interpreting():
            self.plain[grid(self.fallback)](*args, **kwargs, **self.fallback)
        else:
            self.tuned[grid](*args, **kwargs)


_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _constexpr_names(fn) -> set:
    """Names of a kernel's tl.constexpr parameters (a JITFunction, or the interpreter's wrapper)."""
    import inspect

    target = getattr(fn, "fn", fn)
    while hasattr(target, "fn") and not inspect.isfunction(target):
        target = target.fn
    params = inspect.signature(target).parameters.values()
    return {p.name for p in params if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """[first byte, one past the last byte] that a strided tensor can touch."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) + 1
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


def configs(rows: Sequence[tuple], names: Sequence[str]) -> list:
    """``triton.Config`` list from compact rows ``(*block sizes, num_warps, num_stages)``."""
    out = []
    for row in rows:
        *blocks, warps, stages = row
        out.append(triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages))
    return out
