"""Swap target modules for AdaptedLinear, and undo it exactly.

``plan`` validates everything and ``build`` creates the adapter state without touching
the model; only ``commit`` mutates it, and commit cannot fail on user input. That is how
every bad-input error leaves the model untouched, and how load() can check a file
against a model before patching it.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import checks, quant
from . import targets as targets_mod
from .dora import Magnitudes
from .factors import STATE_ATTR, AdapterState, Plan, Slot, is_patched, state_of
from .heads import HeadOriginals
from .layer import AdaptedLinear
from .methods import registry as methods  # the package registers every built-in method on import
from .ops import registry
from .ops.functions import check_dropout


def adapted_modules(model: nn.Module) -> List[Tuple[str, AdaptedLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def _param_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def plan(model: nn.Module, method: str, rank: Optional[int] = None, targets=None, alpha=None,
         backend: str = "auto", *, dropout: float = 0.0, use_rslora: bool = False,
         rank_pattern: Optional[Mapping[str, int]] = None, alpha_pattern: Optional[Mapping[str, float]] = None,
         modules_to_save: Optional[Sequence[str]] = None, use_dora: bool = False, autocast_adapter_dtype: bool = True,
         rank_limit: bool = True, **options) -> Plan:
    """Validate a patch request against a model; raises before anything is modified.

    ``rank=None`` means the default (8). Methods with a ``resolve_rank`` hook see the value
    as given, so that they can tell an explicit rank from the default (AdaLoRA's target_r).
    ``rank_limit=False`` accepts ranks above min(in, out) (legal, if wasteful, in a PEFT file that
    ``load_peft`` reads; ``patch`` refuses them as a likely mistake).
    """
    spec = methods.get(method)
    requested = checks.integer("rank", rank, 1, allow_none=True)
    rank = methods.DEFAULT_RANK if requested is None else requested
    # s = alpha/r: 0 trains nothing, inf gives NaN, a negative one only flips B's sign (refused as a typo)
    alpha = checks.real("alpha", alpha, 0.0, float("inf"), low_open=True, high_open=True, allow_none=True)
    registry.check_name(backend)
    dropout = check_dropout(dropout)
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be True or False, got {use_rslora!r}")
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    if not isinstance(autocast_adapter_dtype, bool):
        raise TypeError(f"autocast_adapter_dtype must be True or False, got {autocast_adapter_dtype!r}")
    if use_dora and not spec.dora:
        raise ValueError(f"use_dora does not apply to {method!r}: DoRA's magnitude needs a fixed low-rank ΔW, and "
                         f"{method!r} allocates its ranks on a budget (PEFT does not combine them either); methods "
                         f"it applies to: {', '.join(n for n in methods.names() if methods.get(n).dora)}")
    if use_rslora and not spec.rslora:
        raise ValueError(f"use_rslora does not apply to {method!r}, whose scale is not α/r; methods it applies to: "
                         f"{', '.join(n for n in methods.names() if methods.get(n).rslora)}")
    opts = methods.parse_options(spec, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError(f"this model is already patched with {state_of(model).plan.method!r}; "
                         "call peftkern.unpatch(model) first")
    peft_layers = [n or type(m).__name__ for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if peft_layers:
        # PEFT's own layers (lora_A, base_layer, ...) would be adapted, or frozen, as if they were the model's
        raise ValueError(f"this model holds PEFT adapter layers ({', '.join(peft_layers[:2])}, ...: a PeftModel, or "
                         "get_peft_model's result); peftkern patches the base model: take it back with "
                         "model.unload() (or merge_and_unload() to keep the adapter in the weights), or load a "
                         "saved PEFT adapter onto the base model with peftkern.load_peft(base, directory)")
    slots = targets_mod.find_targets(model, targets)
    size_rank = spec.resolve_rank(requested, opts) if spec.resolve_rank else rank
    ranks = _pattern("rank_pattern", rank_pattern, slots, spec, lambda k, v: checks.integer(f"rank_pattern[{k!r}]", v))
    alphas = _pattern("alpha_pattern", alpha_pattern, slots, spec,
                      lambda k, v: checks.real(f"alpha_pattern[{k!r}]", v, 0.0, float("inf"), low_open=True,
                                               high_open=True))
    for s in slots:
        limit, r = min(s.in_features, s.out_features), ranks.get(s.path, size_rank)
        if r > limit and rank_limit:
            raise ValueError(f"rank {r} is larger than {s.path} allows ({s.in_features}->{s.out_features}: "
                             f"at most {limit})")
    to_save = targets_mod.modules_to_save(model, modules_to_save)
    both = [s.path for s in slots if any(s.path == m or s.path.startswith(m + ".") for m in to_save)]
    if both:
        # an adapted module trained in full too has no single meaning (which copy does disable_adapter
        # restore, what does merge fold into): one or the other
        raise ValueError(f"{', '.join(both[:4])}{', ...' if len(both) > 4 else ''}: both adapted (targets) and "
                         f"trained in full (modules_to_save {to_save}); drop it from one of them "
                         f"(modules_to_save=[] adapts a task head instead of training it)")
    # the same question through a tied weight (an LM head sharing the input embeddings' matrix): trained in
    # full as the saved module and adapted as the target, which no adapter file can hold
    saved = {id(p): m for m in to_save for p in model.get_submodule(m).parameters()}
    tied = [(s.path, saved[id(p)]) for s in slots for p in model.get_submodule(s.path).parameters(recurse=False)
            if id(p) in saved]
    if tied:
        raise ValueError(f"{tied[0][0]}: adapted (targets), and its weight is tied to {tied[0][1]}, which "
                         f"modules_to_save trains in full; adapt it or train it in full, not both (drop one of the "
                         f"two, or untie the weights first)")
    # bitsandbytes' layers by kind, not dtype: a 4-bit weight stored as bf16 (bnb_4bit_quant_storage) is floating
    quantized = [m for m in to_save if any(quant.kind(sub) for sub in model.get_submodule(m).modules())]
    if quantized:
        # a quantized weight (bitsandbytes' packed 4-bit, int8) takes no gradient: it cannot be trained in full
        raise ValueError(f"modules_to_save {quantized}: quantized weights cannot be trained in full (they take no "
                         f"gradient); adapt those modules instead (targets), or load them unquantized "
                         f"(BitsAndBytesConfig(llm_int8_skip_modules=[...]))")
    if use_dora and (edited := targets_mod.edited_in_place(model, [s.path for s in slots])) is not None:
        raise ValueError(f"use_dora: this model's own code edits the output of {edited[0]} in place ({edited[1]}), "
                         "and DoRA keeps that output for its backward (its magnitude's gradient is read back from "
                         f"it); leave {edited[0].rpartition('.')[2]} out of targets with use_dora (PEFT's DoRA keeps "
                         "no output and allows it)")
    if use_dora:
        # accelerate keeps an offloaded layer's weight on meta outside its forward; DoRA's norm reads W0 there
        offloaded = [s.path for s in slots if "_hf_hook" in (m := model.get_submodule(s.path)).__dict__
                     and m.weight.is_meta]
        if offloaded:
            raise ValueError(f"use_dora reads W0 outside a layer's forward (its norm ‖W0 + ΔW‖), and {offloaded[0]} "
                             f"(and {len(offloaded) - 1} more) is offloaded by accelerate (its weight on the meta device "
                             "until its forward); load the model without offloading those layers, or patch without "
                             "use_dora")
    device, model_dtype = _param_device_dtype(model)
    dtype = model_dtype
    if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
        # PEFT's default: the adapter's own weights in fp32 on a half-precision model, cast to the compute
        # dtype in each forward. In bf16 an update below 2⁻⁹ of a weight rounds away, so DoRA's
        # magnitudes (updates ~lr, values ~1) would not train at all at the usual rates.
        dtype = torch.float32
    p = Plan(method=method, rank=size_rank, alpha=spec.default_alpha(rank) if alpha is None else alpha,
             options=opts, slots=slots, device=device, dtype=dtype, model_type=targets_mod.model_type(model),
             backend=backend, requested_rank=requested, dropout=dropout, rank_pattern=ranks, alpha_pattern=alphas,
             use_rslora=use_rslora, modules_to_save=to_save,
             use_dora=use_dora, autocast_adapter_dtype=autocast_adapter_dtype, model_dtype=model_dtype)
    validate = getattr(opts, "validate", None)
    if validate is not None:
        validate(p)
    return p


def _pattern(name: str, pattern: Optional[Mapping[str, Any]], slots: Sequence[Slot], spec: methods.Method,
             check) -> Dict[str, Any]:
    """PEFT's rank_pattern / alpha_pattern: {key: value}, a key matching a module path when the path
    ends with it (``re.match(rf"(.*\\.)?({key})$", path)``, PEFT's rule). Returns {slot path: value}."""
    if not pattern:
        return {}
    if not isinstance(pattern, Mapping):
        raise TypeError(f"{name} must be a dict of module-name pattern -> value, got {type(pattern).__name__}")
    if not spec.per_module_rank:
        raise ValueError(f"{name} needs a method whose ranks may differ per module; {spec.name!r} shares or "
                         f"generates its factors. Methods that take it: "
                         f"{', '.join(n for n in methods.names() if methods.get(n).per_module_rank)}")
    out: Dict[str, Any] = {}
    for key, value in pattern.items():
        value = check(key, value)
        targets_mod.compile_pattern(f"{name} key", key)
        hits = [s.path for s in slots if re.match(rf"(.*\.)?({key})$", s.path)]
        if not hits:
            raise ValueError(f"{name} key {key!r} matches none of the adapted modules "
                             f"({', '.join(s.path for s in slots[:6])}{', ...' if len(slots) > 6 else ''})")
        for path in hits:
            out.setdefault(path, value)  # the first matching key wins, as in PEFT
    return out


def build(p: Plan) -> AdapterState:
    """Create the method's state for a plan, with its backends resolved. Touches no model."""
    state = new_state(p)
    resolve_backends(state)
    return state


def new_state(p: Plan) -> AdapterState:
    """The method's state for a plan, with DoRA's magnitudes when the plan asks for them (the one place
    that makes a state: patching and the copies a sharded model's save takes); backends unresolved."""
    state = methods.get(p.method).build(p)
    if p.use_dora:
        state.dora = Magnitudes([s.out_features for s in p.slots], device=p.device, dtype=p.dtype)
        state.dora.batch_norms = not state.generators()  # generated factors are new tensors each forward
    return state


@torch.no_grad()
def start_magnitudes(model: nn.Module, state: AdapterState) -> None:
    """DoRA's m = ‖W0 + ΔW‖_row for every adapted module of a freshly patched model (PEFT's start)."""
    for path, layer in adapted_modules(model):
        f = state.factors(layer.slot)
        state.dora.initialize(layer.slot, layer.dense_weight(), f.A, f.B, f.u, f.v, f.scale)


def resolve_backends(state: AdapterState) -> None:
    """Decide now, before the model is touched, which backend runs every op of the adapter on the
    model's device (and on CUDA when a GPU is present): the first forward then loads and logs
    nothing, so that it traces cleanly under torch.compile. Raises BackendUnavailable when
    ``backend="auto"`` finds none for the model's device."""
    plan = state.plan
    shapes = {((s.out_features, s.in_features, plan.slot_rank(s)), s.quantized is None) for s in plan.slots}
    state.backends.prepare(registry.prepared_device_types(plan.device.type), sorted(shapes))


def commit(model: nn.Module, state: AdapterState, fresh: bool = True) -> nn.Module:
    """Mutate the model: swap targets, register the state, freeze the base, attach hooks.

    The new modules take the model's mode (a model patched in eval mode stays in eval mode),
    and later ``model.train()`` / ``model.eval()`` reach them: they are submodules. ``fresh``: a new
    adapter (DoRA's magnitudes start from the base weights); a loaded one brings its own."""
    frozen_from: Dict[str, bool] = {n: prm.requires_grad for n, prm in model.named_parameters()}
    try:
        return _commit(model, state, fresh, frozen_from)
    except BaseException:  # a failure half way (a review's finding: DoRA's start on an unready base) undone
        _rollback(model, state, frozen_from)
        raise


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _rollback(model: nn.Module, state: AdapterState, frozen_from: Dict[str, bool]) -> None:
    """The model as before a ``commit`` that failed part way: its modules, its flags, no state."""
    if getattr(model, STATE_ATTR, None) is state:
        uncommit(model)
    for path, layer in adapted_modules(model):  # swapped before the state was registered
        _set_module(model, path, layer.base_layer)
    for name, prm in model.named_parameters():
        prm.requires_grad_(frozen_from.get(name, prm.requires_grad))


def _commit(model: nn.Module, state: AdapterState, fresh: bool, frozen_from: Dict[str, bool]) -> nn.Module:
    for prm in model.parameters():
        prm.requires_grad_(False)
    for slot in state.plan.slots:
        _set_module(model, slot.path, AdaptedLinear(model.get_submodule(slot.path), state, slot.index).train(model.training))
    if state.plan.modules_to_save:  # their originals, for disable_adapter and unpatch (heads.py)
        state.add_module("heads", HeadOriginals(model, state.plan.modules_to_save))
    model.add_module(STATE_ATTR, state.train(model.training))
    for name in state.plan.modules_to_save:
        for prm in model.get_submodule(name).parameters():
            prm.requires_grad_(True)
    state._restore = {"requires_grad": frozen_from}
    state._handles = [*state.casts.attach(model), *state.attach(model)]  # casts.py: trained factors cast together
    if any(s.quantized for s in state.plan.slots):
        quant.keep_trainable(model)
    if fresh and state.dora is not None:
        start_magnitudes(model, state)
    state.record_dtypes()  # what train() keeps (factors.AdapterState: TRL's cast of a quantized model)
    return model


def uncommit(model: nn.Module, keep_heads: bool = False) -> nn.Module:
    """Undo commit() exactly: original module objects, original requires_grad flags, and the original
    values of ``modules_to_save`` unless ``keep_heads`` (a merged model keeps its trained head)."""
    state = state_of(model)
    heads = getattr(state, "heads", None)
    if heads is not None and not keep_heads:
        heads.restore(model)
    for handle in getattr(state, "_handles", []):
        handle.remove()
    for path, module in adapted_modules(model):
        _set_module(model, path, module.base_layer)
    delattr(model, STATE_ATTR)
    flags = getattr(state, "_restore", {}).get("requires_grad", {})
    for name, prm in model.named_parameters():
        if name in flags:
            prm.requires_grad_(flags[name])
    return model


def shared_weights(model: nn.Module) -> Dict[str, List[str]]:
    """{adapted module path: [other parameters that are its base weight]}: weights tied to another
    module (an LM head tied to the input embeddings). Merging ΔW into such a weight would change
    the other module too, so merge refuses them (api.merge)."""
    layers = adapted_modules(model)
    if not layers:
        return {}
    by_storage: Dict[Tuple[int, int], List[str]] = {}
    for name, prm in model.named_parameters(remove_duplicate=False):
        if prm.device.type != "meta":
            by_storage.setdefault((prm.untyped_storage().data_ptr(), prm.storage_offset()), []).append(name)
    out: Dict[str, List[str]] = {}
    for path, layer in layers:
        w = layer.base_layer.weight
        if w.device.type == "meta":
            continue
        own = f"{path}.base_layer.weight"
        others = [n for n in by_storage.get((w.untyped_storage().data_ptr(), w.storage_offset()), []) if n != own]
        if others:
            out[path] = others
    return out
