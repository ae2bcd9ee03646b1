"""The registry of backends, and the one place that decides which backend runs a module's ops.

Each backend declares itself with ``register_backend(BackendSpec(...))``: its name, the
device types it may serve, its place in ``backend="auto"``'s order per device type, and a
loader that builds its ``Backend`` (backend.py: the kernels, and optionally AdaLoRA's step
ops). Loaders run on first request, so importing peftkern never imports triton or the
compiled extension; a loader's failure is remembered with its cause. The built-in backends
(torch, cpp, triton) register in ``backends/__init__.py``, which importing ``peftkern.ops``
runs; adding one is one more ``register_backend`` call, nothing else changes.

``resolve(requested, device_type, shape)`` is the decision:

* an explicit name: that backend, or ``BackendUnavailable`` naming the cause;
* ``"auto"``: the registered backends that declare an auto priority for ``device_type``,
  lowest first, the first that loads (cpu: cpp, then torch with a one-time warning naming
  the cause; cuda: torch, the Triton kernels being chosen only for module shapes where a
  verified GPU run measured them faster, ``cuda_policy.json``; any other device: torch);
* a module whose rank is above the chosen backend's ``max_rank`` runs on its ``over_rank``
  backend instead (Triton keeps the whole rank in one tile: ranks above 128 run on torch).

Auto's choice is logged once per device type (logger "peftkern"), never from inside a
torch.compile trace. ``Resolver`` caches the decisions of one adapter; patching resolves
the model's device types up front (``Resolver.prepare``), so that nothing is loaded or
logged at the first forward, compiled or not.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .backend import Backend, BackendUnavailable

log = logging.getLogger("peftkern")

Shape = Optional[Tuple[int, int, int]]  # (N, K, r) of a module, None for ops without one (hypernet, step ops)


@dataclass(frozen=True)
class BackendSpec:
    """How a backend declares itself (module docstring)."""

    name: str
    loader: Callable[[], Backend]
    # device type -> place in auto's order (lower first); "*" stands for every other device type
    auto: Dict[str, int] = field(default_factory=dict)
    # device type -> why auto prefers it there, for the one-time log line
    why: Dict[str, str] = field(default_factory=dict)
    # device type -> None if it can run there, else the cause (checked before loading)
    precheck: Optional[Callable[[str], Optional[str]]] = None
    # auto may take it for the module shapes a verified GPU run lists (cuda_policy.json)
    policy: bool = False


_SPECS: Dict[str, BackendSpec] = {}
_CACHE: Dict[str, Backend] = {}
_FAILURES: Dict[str, str] = {}
_SAID: set = set()

# Shapes (N, K, r) where a verified GPU run measured another backend faster than torch: written by hand
# from a gpu_check.sh run whose GPU tests passed (no script writes it). Absent means torch everywhere.
CUDA_POLICY = Path(__file__).with_name("cuda_policy.json")


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Declare a backend. Raises ValueError for a taken name or the reserved name "auto"."""
    if spec.name == "auto" or spec.name in _SPECS:
        raise ValueError(f"backend name {spec.name!r} is reserved or already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister_backend(name: str) -> None:
    """Remove a backend (and what was loaded or remembered for it)."""
    _SPECS.pop(name, None)
    _CACHE.pop(name, None)
    _FAILURES.pop(name, None)


def names() -> Tuple[str, ...]:
    """Every name ``backend=`` accepts: "auto" and the registered backends."""
    return ("auto", *_SPECS)


def check_name(name: str) -> None:
    if name not in names():
        raise ValueError(f"unknown backend {name!r}; valid choices: {', '.join(names())}")


def load(name: str) -> Backend:
    """Load a registered backend by name, or raise BackendUnavailable with the remembered cause."""
    check_name(name)
    if name in _CACHE:
        return _CACHE[name]
    if name in _FAILURES:
        raise BackendUnavailable(_FAILURES[name])
    try:
        backend = _SPECS[name].loader()
    except Exception as exc:  # any import/build problem becomes a named cause
        _FAILURES[name] = str(exc) if isinstance(exc, BackendUnavailable) else f"{type(exc).__name__}: {exc}"
        raise BackendUnavailable(_FAILURES[name]) from exc
    _CACHE[name] = backend
    return backend


def cuda_policy(dense: bool = True) -> Dict[Tuple[int, int, int], str]:
    """{(N, K, r): backend name} from a verified GPU run, or {} (module docstring), for modules with a
    dense base weight, or (``dense=False``) a 4-bit one: entries with ``"base": "4bit"``, measured
    on their own, since a 4-bit base runs another kernel (the fused QLoRA GEMM)."""
    if not CUDA_POLICY.is_file():
        return {}
    data = json.loads(CUDA_POLICY.read_text())
    if not data.get("verified"):
        return {}
    base = "dense" if dense else "4bit"
    return {tuple(entry["shape"]): entry["backend"] for entry in data.get("shapes", [])
            if entry.get("base", "dense") == base}


def auto_choice(device_type: str, shape: Shape = None, dense: bool = True) -> Tuple[str, ...]:
    """auto's candidates for ``device_type`` (and a module shape, its base dense or quantized), first
    choice first."""
    ranked = sorted((spec.auto.get(device_type, spec.auto.get("*")), i, name)
                    for i, (name, spec) in enumerate(_SPECS.items())
                    if spec.auto.get(device_type, spec.auto.get("*")) is not None)
    order = tuple(name for _, _, name in ranked)
    if device_type == "cuda" and shape is not None:
        chosen = cuda_policy(dense).get(tuple(shape))
        if chosen in _SPECS and _SPECS[chosen].policy:
            return (chosen, *(n for n in order if n != chosen))
    return order


def _runs_here(name: str, device_type: str) -> Backend:
    spec = _SPECS[name]
    cause = spec.precheck(device_type) if spec.precheck is not None else None
    if cause is not None:
        raise BackendUnavailable(cause)
    backend = load(name)
    if device_type not in backend.devices:
        raise BackendUnavailable(f"backend={name!r} was not built for {device_type} tensors")
    return backend


def resolve(requested: str, device_type: str, shape: Shape = None, dense: bool = True) -> Backend:
    """The backend that runs tensors of ``device_type`` (for a module of ``shape`` (N, K, r), with a
    dense base weight or not) when ``requested`` was asked for (module docstring). Raises
    BackendUnavailable naming the cause."""
    return _resolve(requested, device_type, shape, dense)[0]


def _resolve(requested: str, device_type: str, shape: Shape, dense: bool = True) -> Tuple[Backend, str]:
    """(backend, note): the note says why a module runs elsewhere than asked (rank limit, quantized base)."""
    check_name(requested)
    backend = _resolve_auto(device_type, shape, dense) if requested == "auto" else _runs_here(requested, device_type)
    if shape is not None and backend.max_rank is not None and shape[2] > backend.max_rank:
        note = f"rank {shape[2]} > {backend.name}'s {backend.max_rank}: on {backend.over_rank}"
        return _runs_here(backend.over_rank, device_type), note
    if not dense and not backend.lowrank_only:
        note = (f"the base product runs apart (a quantized or hooked base layer), {backend.name} fuses it with the "
                f"adapter only: on {backend.over_rank}")
        return _runs_here(backend.over_rank, device_type), note
    return backend, ""


def _resolve_auto(device_type: str, shape: Shape, dense: bool = True) -> Backend:
    candidates = auto_choice(device_type, shape, dense)
    causes = []
    for name in candidates:
        try:
            backend = _runs_here(name, device_type)
        except BackendUnavailable as exc:
            causes.append(f"{name}: {exc}")
            continue
        _say_once(device_type, name, candidates[0], causes)
        return backend
    raise BackendUnavailable(f"no backend runs {device_type} tensors: " + "; ".join(causes))


def _say_once(device_type: str, name: str, first: str, causes: List[str]) -> None:
    key = (device_type, name)
    # dynamo cannot trace logging or warnings: a compiled first call says it at the next eager one
    if key in _SAID or torch.compiler.is_compiling():
        return
    _SAID.add(key)
    if name != first:  # never a silent fallback
        warnings.warn(f"peftkern: backend='auto' wanted {first!r} for {device_type} tensors but it is unavailable "
                      f"({'; '.join(causes)}); using the {name} backend instead", RuntimeWarning, stacklevel=5)
    else:
        why = _SPECS[name].why.get(device_type) or _SPECS[name].why.get("*") or "the only candidate"
        log.info("peftkern: backend='auto' runs %s tensors on the %s kernels (%s)", device_type, name, why)


def unavailable(name: str, device_type: str) -> Optional[str]:
    """None if backend ``name`` runs ``device_type`` tensors here, else the cause."""
    try:
        _runs_here(name, device_type)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def availability() -> Dict[str, Optional[str]]:
    """name -> None if the backend loads, else the cause. Used by explain() and the CLI."""
    out: Dict[str, Optional[str]] = {}
    for name in names()[1:]:
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


def step_op(backend: Backend, op: str, tensors: Sequence[torch.Tensor]) -> Tuple[Callable, str]:
    """AdaLoRA's step op ``op`` ("update_importance" or "gram_distances") for ``tensors``: ``backend``'s
    own where it serves them, else the torch backend's (which serves every device), with the name of
    the backend that runs it, for explain(). Under torch.compile, torch's: a compiled extension call
    would break the graph."""
    own = backend.step
    if own is not None and not torch.compiler.is_compiling() and own.serves(op, tensors):
        return getattr(own, op), backend.name
    return getattr(load("torch").step, op), "torch"


class Resolver:
    """The backends of one adapter: ``get(device_type, shape)`` resolves once and caches.

    Held by the adapter state (``AdapterState.backends``) for every op it runs: the adapted
    modules (per shape), the hypernetworks and AdaLoRA's step ops. Kernels are process-local:
    a copy or an unpickled state starts with an empty cache and resolves its own."""

    def __init__(self, requested: str):
        self.requested = requested
        self._cache: Dict[Tuple[str, Shape, bool], Tuple[Backend, str]] = {}

    def get(self, device_type: str, shape: Shape = None, dense: bool = True) -> Backend:
        hit = self._cache.get((device_type, shape, dense))
        if hit is None:
            hit = self._cache[(device_type, shape, dense)] = _resolve(self.requested, device_type, shape, dense)
        return hit[0]

    def note(self, device_type: str, shape: Shape = None, dense: bool = True) -> str:
        """Why this module runs elsewhere than asked ("" when it does not); after ``get``."""
        self.get(device_type, shape, dense)
        return self._cache[(device_type, shape, dense)][1]

    def prepare(self, device_types: Iterable[str], shapes: Iterable[Tuple[Shape, bool]]) -> None:
        """Resolve now (at patch time) what the first forward would: ``auto`` for every device type,
        an explicit backend where it can run (elsewhere its error comes at that device's forward,
        as a model patched on the CPU may be moved to CUDA). ``shapes``: (shape, dense) per module kind."""
        shapes = list(shapes)
        # step_op's fallback, loaded now: a compiled forward reaching its first load() guards on the cache
        # not holding it, and recompiled once after (a review's finding, AdaLoRA's regulariser)
        load("torch")
        for device_type in device_types:
            for shape, dense in [(None, True), *shapes]:
                try:
                    self.get(device_type, shape, dense)
                except BackendUnavailable:
                    if self.requested == "auto" and device_type != "cuda":
                        raise
                    break

    def __getstate__(self):
        return {"requested": self.requested, "_cache": {}}

    def __deepcopy__(self, memo):
        return Resolver(self.requested)


def prepared_device_types(device_type: str) -> List[str]:
    """The device types a model on ``device_type`` resolves at patch time: its own, and CUDA's when a
    GPU is present (a model patched on the CPU is often moved there next)."""
    out = [device_type]
    if device_type != "cuda" and torch.cuda.is_available():
        out.append("cuda")
    return out


__all__ = ["BackendSpec", "Backend", "BackendUnavailable", "Resolver", "register_backend", "unregister_backend",
           "names", "check_name", "load", "resolve", "unavailable", "auto_choice", "availability", "cuda_policy", "step_op",
           "prepared_device_types", "CUDA_POLICY"]
