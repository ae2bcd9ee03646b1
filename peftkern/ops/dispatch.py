"""Backend choice: ``backend="auto" | "triton" | "cpp" | "torch"``.

A backend (backend.py) is a bundle of 2-D kernels. Backends register a *loader*, so
importing peftkern never imports triton or the compiled extension; the first request
does, and a failure is remembered together with its cause.

``auto`` takes, for each device type, the first backend of ``AUTO`` that loads:

    cpu    cpp (the C++ extension), else torch with a one-time warning naming the cause
    cuda   torch (cuBLAS). The Triton kernels are not chosen by auto on CUDA until they
           pass the GPU suite on the hardware (benchmarks/gpu_check.sh); the first GPU run
           found wrong gradients and a crash (fixed since, but not re-verified on a GPU).
           When a verified run exists, ``CUDA_POLICY`` lists the module shapes where the
           measured Triton (or C++ node) step beat the torch one, and only those take it.
    other  torch

Whatever auto picks is logged once per device type (logger "peftkern"), and
``peftkern.explain(model)`` prints it per module. An explicit backend that cannot run raises.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from .backend import Backend, BackendUnavailable

log = logging.getLogger("peftkern")

BACKEND_NAMES = ("auto", "triton", "cpp", "torch")

# auto's candidates per device type, first choice first (module docstring)
AUTO: Dict[str, Tuple[str, ...]] = {"cpu": ("cpp", "torch"), "cuda": ("torch",)}
WHY = {
    ("cuda", "torch"): "the Triton kernels have not passed the GPU suite yet (benchmarks/gpu_check.sh); "
                       "backend='triton' runs them anyway",
    ("cpu", "cpp"): "the C++ extension's fused row-streaming kernels",
}

# Shapes (N, K, r) where a verified GPU run measured another backend faster than torch: Triton,
# or the C++ backend (a CUDA build; its adapter is one C++ autograd node, so less host time per
# call). Committed only from a GPU run that passed the suite. Absent means torch everywhere.
CUDA_POLICY = Path(__file__).with_name("cuda_policy.json")
POLICY_CHOICES = ("triton", "cpp")


def _load_torch() -> Backend:
    from . import torch_kernels

    return torch_kernels.BACKEND


def _load_cpp() -> Backend:
    from . import cpp_kernels  # raises ImportError naming the cause if the extension is missing

    return cpp_kernels.BACKEND


def _load_triton() -> Backend:
    if os.environ.get("TRITON_INTERPRET") != "1":
        try:
            import torch

            if not torch.cuda.is_available():
                raise BackendUnavailable("Triton compiles for CUDA and no CUDA device is available (on the CPU it "
                                         "runs only under TRITON_INTERPRET=1, set before triton is imported)")
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
    try:
        from .. import triton_kernels
    except ImportError as exc:  # triton itself, or our kernels package, is missing
        raise BackendUnavailable(f"cannot import peftkern.triton_kernels: {exc}") from exc
    return triton_kernels.BACKEND


_LOADERS: Dict[str, Callable[[], Backend]] = {"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton}
_CACHE: Dict[str, Backend] = {}
_FAILURES: Dict[str, str] = {}
_SAID: set = set()


def load(name: str) -> Backend:
    """Load a backend by name or raise BackendUnavailable with the remembered cause."""
    if name in _CACHE:
        return _CACHE[name]
    if name in _FAILURES:
        raise BackendUnavailable(_FAILURES[name])
    try:
        backend = _LOADERS[name]()
    except Exception as exc:  # any import/build problem becomes a named cause
        _FAILURES[name] = str(exc) if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"
        raise BackendUnavailable(_FAILURES[name]) from exc
    _CACHE[name] = backend
    return backend


def triton_runs_on(device_type: str) -> bool:
    """Triton compiles for CUDA; on the CPU it only runs under the interpreter."""
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def check_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; valid choices: {', '.join(BACKEND_NAMES)}")


def cuda_policy() -> Dict[Tuple[int, int, int], str]:
    """{(N, K, r): "triton"} from a verified GPU run, or {} (module docstring)."""
    if not CUDA_POLICY.is_file():
        return {}
    data = json.loads(CUDA_POLICY.read_text())
    if not data.get("verified"):
        return {}
    return {tuple(entry["shape"]): entry["backend"] for entry in data.get("shapes", [])}


def resolve(requested: str, device_type: str, shape: Optional[Tuple[int, int, int]] = None) -> Backend:
    """The backend that runs tensors of ``device_type`` (for a module of ``shape`` (N, K, r)) when
    ``requested`` was asked for."""
    check_name(requested)
    if requested == "auto":
        return _resolve_auto(device_type, shape)
    if requested == "triton" and not triton_runs_on(device_type):
        raise BackendUnavailable(
            f"backend='triton' cannot run {device_type} tensors: Triton compiles for CUDA, and runs on the "
            "CPU only under TRITON_INTERPRET=1 (set before triton is imported)")
    backend = load(requested)
    if device_type not in backend.devices:
        raise BackendUnavailable(f"backend={requested!r} was not built for {device_type} tensors")
    return backend


def auto_choice(device_type: str, shape: Optional[Tuple[int, int, int]] = None) -> Tuple[str, ...]:
    """auto's candidates for ``device_type`` (and a module shape), first choice first."""
    if device_type == "cuda" and shape is not None:
        chosen = cuda_policy().get(tuple(shape))
        if chosen in POLICY_CHOICES:
            return (chosen, "torch")
    return AUTO.get(device_type, ("torch",))


def _resolve_auto(device_type: str, shape: Optional[Tuple[int, int, int]]) -> Backend:
    candidates = auto_choice(device_type, shape)
    causes = []
    for name in candidates:
        try:
            backend = load(name)
        except BackendUnavailable as exc:
            causes.append(f"{name}: {exc}")
            continue
        if device_type not in backend.devices:
            causes.append(f"{name}: not built for {device_type}")
            continue
        _say_once(device_type, name, candidates[0], causes)
        return backend
    raise BackendUnavailable(f"no backend runs {device_type} tensors: " + "; ".join(causes))


def _say_once(device_type: str, name: str, first: str, causes) -> None:
    key = (device_type, name)
    if key in _SAID:
        return
    _SAID.add(key)
    if name != first:  # never a silent fallback
        warnings.warn(f"peftkern: backend='auto' wanted {first!r} for {device_type} tensors but it is unavailable "
                      f"({'; '.join(causes)}); using the {name} backend instead", RuntimeWarning, stacklevel=4)
    else:
        log.info("peftkern: backend='auto' runs %s tensors on the %s kernels (%s)", device_type, name,
                 WHY.get(key, "the only candidate"))


def availability() -> Dict[str, Optional[str]]:
    """name -> None if the backend loads, else the cause. Used by explain() and the CLI."""
    out: Dict[str, Optional[str]] = {}
    for name in ("torch", "cpp", "triton"):
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


__all__ = ["BACKEND_NAMES", "AUTO", "Backend", "BackendUnavailable", "load", "resolve", "auto_choice", "check_name",
           "availability", "triton_runs_on", "cuda_policy"]
