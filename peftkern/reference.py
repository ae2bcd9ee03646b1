"""The reference model of preference training (DPO), without a second copy of the base weights.

Two references, as TRL builds them for a ``PeftModel``:

* **the policy as it is now, frozen** (``reference_model``'s default): the adapter's values (and a
  trained head's) are copied once, a few MB, and every reference call runs the policy with those
  copies in place of its own tensors, as ``torch.func.functional_call`` does: module table entries
  are swapped for the call, never written in place, so the policy's autograd graph of the same step
  (TRL runs the reference between the policy's forward and its backward) keeps the tensors it saved.
  This is TRL's "ref" adapter, a copy of an adapter that is trained already: DPO after SFT on the
  same adapter then has the SFT policy as its reference. For an adapter still at its
  initialisation (ΔW = 0) it equals the base model.
* **the base model** (``base=True``): the adapter disabled (``disable_adapter``), PEFT's
  ``disable_adapter`` and TRL's reference for a new adapter; no copy, and no adapter compute.

The copies are plain attributes, not parameters: the reference has no parameters of its own, so
nothing counts, trains or saves them twice.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn

from . import dist, patching
from .factors import STATE_ATTR, state_of
from .layer import AdaptedLinear


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with peftkern.disable_adapter(model):`` the model computes as its base model (PEFT's
    ``model.disable_adapter()``, e.g. for a DPO reference pass): every adapted module runs its
    base layer alone, the original ``modules_to_save`` (a task head) run instead of the trained
    ones, no factor is generated and no regulariser is added to ``outputs.loss``. The previous
    state comes back on exit, also after an exception; blocks nest. Raises ValueError if
    ``model`` is not patched, or is merged (its base weights then hold ΔW:
    ``peftkern.unmerge(model)`` first)."""
    state = state_of(model)
    if any(isinstance(m, AdaptedLinear) and m.merged for m in model.modules()):
        raise ValueError("disable_adapter: the model is merged, so its base weights include the adapter; "
                         "call peftkern.unmerge(model) first")
    before = state.disabled
    heads = getattr(state, "heads", None)
    with contextlib.ExitStack() as stack:
        if heads is not None and not before:  # a nested block finds the originals in place already
            stack.enter_context(heads.swapped_in(model))
        state.disabled = True
        try:
            yield model
        finally:
            state.disabled = before


class FrozenValues:
    """The trained tensors of a patched model as they are now (module docstring): every parameter with
    ``requires_grad`` (the adapter's, a trained head's) and the adapter's persistent buffers (AdaLoRA's
    kept ranks, HyperAdaLoRA's state), each copied once, under every name it has (tied weights).

    The caches a forward fills from those values (DoRA's norms, the generated factors of a pass:
    ``AdapterState.pass_caches``) are scoped: the reference keeps its own fields of them, swapped in
    with the values. Shared, a reference pass evicted the policy's norms (recomputed on every call) and
    left its generation where HyperAdaLoRA's optimizer-step hook reads the policy's: it pruned and
    advanced from the frozen values (a review's finding)."""

    def __init__(self, model: nn.Module):
        state = state_of(model)
        named: List[Tuple[str, torch.Tensor]] = [
            (n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
        persistent = set(state.state_dict(keep_vars=True))
        named += [(f"{STATE_ATTR}.{n}", b) for n, b in state.named_buffers(remove_duplicate=False) if n in persistent]
        if any(dist.is_shard(t) for _, t in named):
            raise ValueError("reference_model: the model is sharded with FSDP2, whose forward gathers its own "
                             "parameters over any others; pass base=True (the base model as the reference), or give "
                             "the trainer a reference model of its own")
        copies: Dict[int, torch.Tensor] = {}
        with torch.no_grad():
            self.values = {n: copies.setdefault(id(t), _frozen_copy(t)) for n, t in named}
        self.placed: Dict[str, torch.Tensor] = {}  # copies moved to where the model is now (the originals kept)
        self.state = weakref.ref(state)
        self.scopes = [(cache, cache.fresh_scope()) for cache in state.pass_caches()]
        self.depth = 0  # inside swapped_in: a call nests forward in __call__, a method its forwards

    def _value(self, name: str, live: torch.Tensor) -> torch.Tensor:
        """The copy under ``name`` on the live tensor's device and dtype (converted from the original, once
        per placement: a round trip through bf16 rounds nothing)."""
        value = self.values[name]
        if (value.device, value.dtype) == (live.device, live.dtype):
            return value
        placed = self.placed.get(name)
        if placed is None or (placed.device, placed.dtype) != (live.device, live.dtype):
            with torch.no_grad():
                placed = self.placed[name] = _frozen_copy(value.to(live.device, live.dtype))
        return placed

    def _check(self, model: nn.Module) -> Any:
        state = state_of(model)
        if state is not self.state():
            raise ValueError("the reference model's frozen adapter is gone: the policy was unpatched (and patched "
                             "again) since reference_model(model) was called; make a new reference")
        if state.disabled:
            raise ValueError("the frozen reference was called inside disable_adapter(policy), which would run the "
                             "base model; call it outside the block, or use reference_model(model, base=True)")
        if any(m.merged for _, m in patching.adapted_modules(model)):
            raise ValueError("the frozen reference was called on a merged policy, whose base weights hold its live "
                             "ΔW; call peftkern.unmerge(model) first")
        return state

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Inside the block the model's tables hold the copies, the pass caches the reference's own fields,
        and the adapter adds no regulariser; the live ones come back on exit, also after an exception.
        Raises ValueError where the frozen adapter is gone, the policy is merged or its adapter disabled,
        and RuntimeError while another thread runs the policy (the tables and caches are the model's).
        Re-entrant: a nested block (the forward inside a call) changes nothing more."""
        if self.depth:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
            return
        state = self._check(model)
        if any(getattr(cache, "running_elsewhere", lambda: False)() for cache, _ in self.scopes):
            raise RuntimeError("the frozen reference swaps its values into the policy's modules for its call, and "
                               "another thread is running the policy: call the reference from the thread that "
                               "trains the policy (as TRL does)")
        swapped, scoped = [], []
        before = state.reference_pass
        try:
            for name in self.values:
                path, _, attr = name.rpartition(".")
                module = model.get_submodule(path)
                table = module._parameters if attr in module._parameters else module._buffers
                live = table[attr]
                if dist.is_shard(live):  # sharded after the copy was taken (a trainer applies FSDP2 at train)
                    raise ValueError("reference_model: the model is sharded with FSDP2 now, whose forward gathers its "
                                     "own parameters over the frozen copies; use reference_model(model, base=True), or "
                                     "give the trainer a reference model of its own")
                swapped.append((table, attr, live))
                table[attr] = self._value(name, live)
            for cache, fields in self.scopes:
                scoped.append((cache, {k: getattr(cache, k) for k in fields}))
                for k, v in fields.items():
                    setattr(cache, k, v)
            state.reference_pass = True
            self.depth = 1
            yield
        finally:
            self.depth = 0
            state.reference_pass = before
            for (cache, fields), (_, live) in zip(self.scopes, scoped):
                for k in fields:
                    fields[k] = getattr(cache, k)
                    setattr(cache, k, live[k])
            for table, attr, live in reversed(swapped):
                table[attr] = live


def _frozen_copy(t: torch.Tensor) -> torch.Tensor:
    copy = t.detach().clone()
    return nn.Parameter(copy, requires_grad=False) if isinstance(t, nn.Parameter) else copy


class ReferenceModel(nn.Module):
    """The reference model of a patched ``model``, as a module that shares every base weight with it
    (``reference_model``; module docstring): every call runs the policy with its frozen copies in place
    (or, with ``base``, inside ``disable_adapter``), whatever the forward is: a trainer may replace it (TRL's
    fused LM head does). Attributes it does not have come from the policy; a method of the policy
    (``generate``) runs the same way. A submodule it hands on (the backbone ``.model``, ``lm_head``) is the
    policy's own module, which runs the live adapter when called on its own: call the reference model itself."""

    def __init__(self, model: nn.Module, base: bool = False):
        super().__init__()
        object.__setattr__(self, "policy", model)  # not a submodule: the policy's tensors are not ours twice
        object.__setattr__(self, "frozen", None if base else FrozenValues(model))

    def _as_reference(self):
        policy, frozen = self.__dict__["policy"], self.__dict__["frozen"]
        return disable_adapter(policy) if frozen is None else frozen.swapped_in(policy)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        policy = self.__dict__["policy"]
        value = getattr(policy, name)
        if inspect.ismethod(value) and value.__self__ is policy:
            @functools.wraps(value)
            def as_reference(*args: Any, **kwargs: Any) -> Any:
                with self._as_reference():
                    return value(*args, **kwargs)
            return as_reference
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._as_reference():
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._as_reference():
            return self.policy(*args, **kwargs)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """What identifies this reference, e.g. to TRL, which keys its cache of precomputed reference
        log-probabilities on it (an empty state_dict made every base model alike there: a review's finding).
        Written into ``destination`` when given, as torch's nested calls expect (a parent module's state_dict).

        The frozen policy's: the patched model's state_dict with the frozen copies. With ``base``: the base
        model's, under the base model's names: the adapter's tensors left out, an adapted module's
        ``base_layer`` level dropped from the names, and the original values of ``modules_to_save`` (kept as
        non-persistent copies), so that the unpatched model loads it."""
        positional = dict(zip(("destination", "prefix", "keep_vars"), args))  # torch's deprecated form
        destination = positional.get("destination", destination)
        prefix, keep_vars = positional.get("prefix", prefix), positional.get("keep_vars", keep_vars)
        with self._as_reference():
            full = self.policy.state_dict(prefix=prefix, keep_vars=keep_vars)
        out = destination if destination is not None else type(full)()
        if destination is None and hasattr(full, "_metadata"):
            out._metadata = full._metadata
        if self.frozen is not None:
            out.update(full)
            return out
        own = f"{prefix}{STATE_ATTR}."
        wrapped = tuple(f"{prefix}{path}.base_layer." for path, _ in patching.adapted_modules(self.policy))
        for key, value in full.items():
            if key.startswith(own):
                continue
            level = next((w for w in wrapped if key.startswith(w)), None)
            out[key if level is None else level[:-len("base_layer.")] + key[len(level):]] = value
        heads = getattr(state_of(self.policy), "heads", None)
        if heads is not None:  # the originals' parameters, as buffers that state_dict leaves out
            for path, original in zip(heads.paths, heads.copies):
                trained = self.policy.get_submodule(path)
                values = dict(original.named_buffers(remove_duplicate=False))
                for name, _ in trained.named_parameters(remove_duplicate=False):
                    value = values[name]
                    out[f"{prefix}{path}.{name}"] = value if keep_vars else value.detach()
        return out


def reference_model(model: nn.Module, base: bool = False) -> nn.Module:
    """The reference model of preference training (DPO) for a patched ``model``, with no second copy of
    the base weights (module docstring): by default the policy as it is at this call, frozen (its adapter
    and trained head copied: a few MB), as TRL's reference for a ``PeftModel`` whose adapter is trained
    already (DPO after SFT); for a new adapter that is the base model. ``base=True``: the base model,
    the adapter disabled (no copy, no adapter compute in the reference pass).

    ``trl.DPOTrainer(model, ref_model=peftkern.reference_model(model), ...)``; given ``ref_model=None``
    a patched model gets this reference too (peftkern.hf, with a log line). Raises ValueError for a model
    that is not patched, and for the frozen copy of a model sharded with FSDP2 (``base=True`` serves it)."""
    state_of(model)
    return ReferenceModel(model, base=base)


__all__ = ["disable_adapter", "reference_model", "ReferenceModel", "FrozenValues"]
