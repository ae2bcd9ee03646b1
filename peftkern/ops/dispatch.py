"""Backend choice: ``backend="auto" | "triton" | "cpp" | "torch"``.

A backend is a bundle of four autograd-aware ops with the signatures of ``reference``:
``adapter``, ``shrink``, ``expand`` and ``hypernet``. Backends register a *loader*, so
importing peftkern never imports triton or the compiled extension; the first request
does, and a failure is remembered together with its cause.

``auto`` picks Triton for CUDA tensors, the C++ extension for CPU tensors and the torch
backend otherwise. Whenever ``auto`` cannot have its first choice it says so once, with
the reason (never a silent fallback). An explicit backend that cannot run raises.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger("peftkern")

BACKEND_NAMES = ("auto", "triton", "cpp", "torch")


@dataclass(frozen=True)
class Backend:
    name: str
    adapter: Callable
    shrink: Callable
    expand: Callable
    hypernet: Callable
    devices: Tuple[str, ...]  # device types whose tensors it accepts


class BackendUnavailable(RuntimeError):
    pass


def _load_torch() -> Backend:
    from . import reference, torch_backend

    return Backend("torch", torch_backend.adapter, torch_backend.shrink, torch_backend.expand,
                   reference.hypernet, devices=("cpu", "cuda", "mps", "xpu", "meta"))


def _load_cpp() -> Backend:
    from . import cpp_backend  # raises ImportError naming the cause if the extension is missing

    return cpp_backend.BACKEND


def _load_triton() -> Backend:
    try:
        mod = importlib.import_module("triton_kernels")
    except ImportError as exc:  # triton itself, or our kernels package, is missing
        raise BackendUnavailable(f"cannot import triton_kernels: {exc}") from exc
    return mod.BACKEND


_LOADERS: Dict[str, Callable[[], Backend]] = {"torch": _load_torch, "cpp": _load_cpp, "triton": _load_triton}
_CACHE: Dict[str, Backend] = {}
_FAILURES: Dict[str, str] = {}
_WARNED: set = set()


def load(name: str) -> Backend:
    """Load a backend by name or raise BackendUnavailable with the remembered cause."""
    if name in _CACHE:
        return _CACHE[name]
    if name in _FAILURES:
        raise BackendUnavailable(_FAILURES[name])
    try:
        backend = _LOADERS[name]()
    except Exception as exc:  # any import/build problem becomes a named cause
        _FAILURES[name] = f"{type(exc).__name__}: {exc}"
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


def resolve(requested: str, device_type: str) -> Backend:
    """The backend that runs tensors of ``device_type`` when ``requested`` was asked for."""
    check_name(requested)
    if requested == "torch":
        return load("torch")
    if requested in ("cpp", "triton"):
        if requested == "triton" and not triton_runs_on(device_type):
            raise BackendUnavailable(
                f"backend='triton' cannot run {device_type} tensors: Triton compiles for CUDA, and runs on the "
                "CPU only under TRITON_INTERPRET=1 (set before triton is imported)"
            )
        backend = load(requested)
        if device_type not in backend.devices:
            raise BackendUnavailable(f"backend={requested!r} was not built for {device_type} tensors")
        return backend
    return _resolve_auto(device_type)


def _resolve_auto(device_type: str) -> Backend:
    first = {"cuda": "triton", "cpu": "cpp"}.get(device_type)
    if first is None:
        return load("torch")
    try:
        backend = load(first)
        if device_type in backend.devices:
            return backend
        cause = f"{first} backend was not built for {device_type}"
    except BackendUnavailable as exc:
        cause = str(exc)
    key = (first, device_type)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"peftkern: backend='auto' wanted {first!r} for {device_type} tensors but it is unavailable "
            f"({cause}); using the torch backend instead", RuntimeWarning, stacklevel=3,
        )
    return load("torch")


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


def device_type_of(t: torch.Tensor) -> str:
    return t.device.type
