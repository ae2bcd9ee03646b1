"""Generate an adapter's factors lazily, once per forward pass of the model; reuse when that is exact.

Every method whose factors are computed (LEFT's PG hypernetworks, HyperAdaLoRA's state-update
networks) keeps one ``PassCache``: the first ``factors()`` call of a forward pass generates,
the others of the pass reuse, and checkpoint recomputation, eval and merge reuse or
regenerate by the rules below.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .. import stamps
from ..health import tensors_in

Tensor = torch.Tensor


class PassCache:
    """Generate lazily, once per forward pass of the model; reuse when that is exact.

    ``get(training, generate, watched)`` returns what ``generate()`` made, reused or anew:

    * ``attach(model)``'s root forward pre-hook only marks a new pass. Generating there
      would be too early: under FSDP2 the root's unshard hook may run after ours, and
      the parameters would still be sharded. The pass's first ``get`` generates; the
      others reuse (the hot path: two attribute reads).
    * Outside a pass (merge, explain, export, non-reentrant gradient-checkpoint
      recomputation) the result is reused unless a ``watched`` tensor changed since or an
      optimizer stepped (``peftkern.stamps``: a fused optimizer bumps no version counter;
      no host sync). In-place changes made through ``.data`` bypass both until the next
      step: call ``invalidate()`` after them.
    * A new pass with ``training`` False and grad disabled reuses a result made without
      grad; any other new pass regenerates.
    * A result made without grad cannot serve a call that needs grad. Reentrant
      checkpointing runs the forward without grad and backpropagates each recomputed
      block on its own graph, so after such a pass every call needing grad gets a fresh,
      uncached result (one generation per recomputed call: exact, slower).

    Generation runs with autocast off (the result may be reused outside the caller's
    autocast; consumers cast per use) and with identity saved-tensor hooks: it happens
    inside the first checkpointed block, whose recomputation reuses the result instead
    of generating, so its tensors must be saved normally, not by the checkpoint.

    Calling an inner module instead of the patched root skips the pre-hook; results
    are then regenerated when watched tensors change, or when a backward has run through
    the last result (a hook on its tensors says so): gradient accumulation over such calls
    needs a new graph per micro-batch, where reuse raised "backward through the graph a
    second time" (non-reentrant checkpoint recomputation, inside that backward, still reuses). Under torch.compile the
    simpler rule of ``_get_compiling`` applies. Never copied: a deep copy
    or an unpickled cache starts empty (its tensors belong to an autograd graph).

    One training pass at a time: a pass with grad enabled that starts while another thread's pass with
    grad runs raises RuntimeError (two threads sharing the model's forward, as ``nn.DataParallel``'s
    replicas share this cache), since the second would reuse the first's factors and both backwards
    would run through one graph. Passes without grad share nothing a backward frees, and the factors
    they reuse are the ones they would generate: concurrent inference runs.
    """

    __slots__ = ("value", "key", "no_grad", "in_pass", "new_pass", "gradless_pass", "consumed", "passes")

    def __init__(self):
        self.value: Any = None
        self.key: Optional[tuple] = None
        self.no_grad = False  # value was made with grad disabled
        self.in_pass = False  # between the root's forward pre-hook and its forward hook
        self.new_pass = False  # the pre-hook ran and no get() has checked the value since
        self.gradless_pass = False  # this pass generated with grad disabled
        self.consumed = False  # a backward ran through value (watched only for values made outside a pass)
        # the running passes: thread -> [depth (a forward nested in its own), whether with grad]
        self.passes: Dict[int, List[Any]] = {}

    def running_elsewhere(self) -> bool:
        """Whether another thread's forward pass of the model is running (reference.py refuses to swap then)."""
        thread = threading.get_ident()
        return any(t != thread for t in self.passes)

    def fresh_scope(self) -> Dict[str, Any]:
        """The fields a reference pass keeps apart (reference.py), as a new cache has them: all but the
        running passes, which the thread guard reads across both."""
        fresh = PassCache()
        return {name: getattr(fresh, name) for name in self.__slots__ if name != "passes"}

    def attach(self, model: nn.Module) -> List[Any]:
        return [model.register_forward_pre_hook(_PassStart(self)),
                model.register_forward_hook(_PassEnd(self), always_call=True)]

    def invalidate(self) -> None:
        self.value = None
        self.new_pass = True  # so that a get() inside a running pass regenerates too

    def get(self, training: bool, generate: Callable[[], Any], watched: Callable[[], Iterable[Tensor]]) -> Any:
        if torch.compiler.is_compiling():
            return self._get_compiling(generate)
        grad = torch.is_grad_enabled()
        gradless = self.no_grad and grad
        if self.in_pass and not self.new_pass and not gradless:
            return self.value
        if not self.in_pass and grad and (self.no_grad or self.gradless_pass) and self.value is not None:
            return _generate_plainly(generate, watched)  # reentrant recomputation: see above
        tensors = tuple(watched())
        valid = (self.value is not None and self.key is not None and self.key[0] == stamps.steps()
                 and stamps.matches(self.key[1], tensors) and not gradless)
        if valid and self.new_pass:  # a new forward: only inference may reuse the last value
            valid = self.no_grad and not training and not grad
        if valid and self.consumed and grad and not self.in_pass:  # its graph is gone: a submodule's next forward
            valid = False
        if not valid:
            self.value = _generate_plainly(generate, watched)
            self.key, self.no_grad = (stamps.steps(), stamps.of(*tensors)), not grad
            self.gradless_pass |= self.in_pass and not grad
            self.consumed = False
            if grad and not self.in_pass:  # no pass marks a submodule's forwards: a backward through it will
                _watch_backward(self.value, self)
        self.new_pass = False
        return self.value

    def _get_compiling(self, generate: Callable[[], Any]) -> Any:
        """Under torch.compile: generate at the pass's first request, reuse within the pass. The
        version counters and saved-tensor hooks of the eager rules are not traceable, and are not
        needed: a compiled pass is one graph, recomputed as a whole; the value is dropped at the
        end of the pass (``_PassEnd``) so that no step keeps the previous step's graph alive."""
        grad = torch.is_grad_enabled()
        # a value made without grad (the no-grad forward of reentrant checkpointing) cannot serve a call that
        # needs grad (the regulariser after it): reused, it left the orthogonality term without a gradient
        # to the hypernetworks (a review's finding), as the eager rule ``gradless`` prevents
        if not (self.in_pass and not self.new_pass and self.value is not None and not (self.no_grad and grad)):
            self.value = generate()
            self.key, self.no_grad = None, not grad
        self.new_pass = False
        return self.value

    def __deepcopy__(self, memo):
        return PassCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class _PassStart:
    """Root forward pre-hook. An object, not a closure, so that a deep copy of the model
    gets a hook bound to the copy's cache."""

    def __init__(self, cache: PassCache):
        self.cache = cache

    def __call__(self, module, args):
        cache = self.cache
        if not torch.compiler.is_compiling():  # (a compiled forward is traced in one thread)
            thread, grad = threading.get_ident(), torch.is_grad_enabled()
            if grad and any(t != thread and g for t, (_, g) in cache.passes.items()):
                raise RuntimeError(
                    "peftkern: this model's adapter generates its factors once per forward pass of the model, and "
                    "another thread's training forward pass of it is running (nn.DataParallel runs its replicas "
                    "so, sharing them): the two would share one generated set and one autograd graph. Run one "
                    "training forward at a time per model: DistributedDataParallel (torchrun) for several GPUs, "
                    "or a copy of the model per thread (copy.deepcopy).")
            entry = cache.passes.setdefault(thread, [0, False])
            entry[0] += 1
            entry[1] = entry[1] or grad
        cache.in_pass = cache.new_pass = True
        cache.gradless_pass = False


class _PassEnd:
    def __init__(self, cache: PassCache):
        self.cache = cache

    def __call__(self, module, args, output):
        cache = self.cache
        if torch.compiler.is_compiling():
            cache.in_pass = False
            cache.value = None
            return
        thread = threading.get_ident()
        entry = cache.passes.get(thread)
        if entry is None:  # a pass the start hook refused (this hook runs always)
            return
        entry[0] -= 1
        if entry[0] == 0:
            del cache.passes[thread]
        cache.in_pass = bool(cache.passes)


def _keep(t: Tensor) -> Tensor:
    return t


def _watch_backward(value: Any, cache: PassCache) -> None:
    """Mark ``cache`` consumed when a backward computes a gradient for any tensor of ``value``."""
    def consumed(grad: Tensor) -> None:
        cache.consumed = True

    for t in tensors_in(value):
        if t.requires_grad:
            t.register_hook(consumed)


def _generate_plainly(generate: Callable[[], Any], watched: Callable[[], Iterable[Tensor]]) -> Any:
    """``generate()`` with autocast off and any saved-tensor hooks shadowed (the innermost
    pair wins), so that a checkpointed block around us neither drops nor counts its tensors."""
    device_type = next(iter(watched())).device.type
    with contextlib.ExitStack() as stack:
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        if torch.is_grad_enabled():
            try:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_keep, _keep))
            except RuntimeError:  # hooks are disabled here, so none can be active either
                pass
        return generate()



__all__ = ["PassCache"]
