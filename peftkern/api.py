"""The public API. Each function validates first and mutates last."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from . import hf, native_format, patching, peft_format, quant
from .factors import is_patched, state_of
from .layer import APART_TEXT
from .methods import registry as _methods
from .methods.allocator import takes_regularization
from .ops import functions, registry

log = logging.getLogger("peftkern")


def patch(model: nn.Module, method: str = "lora", rank: Optional[int] = None, targets=None, alpha: Optional[float] = None,
          backend: str = "auto", *, dropout: float = 0.0, use_rslora: bool = False,
          rank_pattern: Optional[Dict[str, int]] = None, alpha_pattern: Optional[Dict[str, float]] = None,
          modules_to_save: Optional[List[str]] = None, use_dora: bool = False, autocast_adapter_dtype: bool = True,
          **options: Any) -> nn.Module:
    """Adapt ``model`` in place with ``method`` and return it (y = W0·x + s·Λv·B·Λu·A·D(x) per target).

    Args:
        method: a registered method name, see ``peftkern.methods()``.
        rank: r (int >= 1), default 8. For AdaLoRA-style methods, the target average rank.
        targets: module names (suffix match, e.g. ``["q_proj", "v_proj"]``), one regex over
            module paths, or ``"all-linear"`` (every Linear/Conv1D in the model's blocks, as
            PEFT). Default: the architecture's attention query and value.
        alpha: s = alpha / r, a finite number > 0. Default: the method's paper setting.
        backend: "auto" or a registered backend ("triton", "cpp", "torch"; ``explain()`` says which
            runs). It is resolved here, for the model's device (and CUDA's when a GPU is
            present); a named backend that cannot run on some device raises at that device's
            first forward instead (a model patched on the CPU may train on CUDA).
        dropout: PEFT's lora_dropout, the probability of zeroing an element of the adapter's
            input in training (fused in every backend; no mask is stored).
        use_rslora: s = alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023), for methods scaled by α/r.
        rank_pattern, alpha_pattern: PEFT's per-module ranks and alphas, {name pattern: value}
            (methods with per-module factors: ``lora``).
        modules_to_save: modules trained in full next to the adapter (PEFT's name). Default:
            the task head of a transformers classification / QA model, else none.
        use_dora: DoRA (Liu et al. 2024, PEFT's name): y = m ⊙ (W0 + ΔW)·x / ‖W0 + ΔW‖_row + b,
            with a trained magnitude m [N] per module starting at ‖W0‖_row. For lora, tied_lora,
            vera and the PG methods (not adalora, hyper_adalora, nor joint=True).
        autocast_adapter_dtype: on a bf16/fp16 model, keep the adapter's weights (factors, DoRA's
            magnitudes, hypernetworks) in fp32 and cast them to the compute dtype in each forward
            (PEFT's name and default); False keeps them in the model's dtype, where updates below
            2⁻⁹ (bf16) of a weight are lost. No effect on an fp32 model.
        **options: the method's options; an unknown one raises TypeError listing the valid ones.

    Raises TypeError / ValueError naming the problem and the valid choices, before the model
    is touched: an unknown method, option or backend, a rank or alpha of the wrong kind or
    range, targets that match nothing, a model that is already patched.
    """
    p = patching.plan(model, method, rank, targets, alpha, backend, dropout=dropout, use_rslora=use_rslora,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, modules_to_save=modules_to_save,
                      use_dora=use_dora, autocast_adapter_dtype=autocast_adapter_dtype, **options)
    state = patching.build(p)
    patching.commit(model, state)
    hf.bind(model)
    log.info("peftkern: patched %d modules with %r (rank %d, backend %r)", len(p.slots), method, p.rank, backend)
    return model


def unpatch(model: nn.Module, merge: bool = False, requantize: bool = False) -> nn.Module:
    """Remove the adapter and put the original modules back; returns ``model``.

    With ``merge=True`` the adapter is first folded into the base weights and the trained
    ``modules_to_save`` (a task head) are kept: the fine-tuned model (PEFT's
    merge_and_unload). Without it the base model comes back bit-identical, the original values
    of ``modules_to_save`` included (PEFT's ``unload()`` keeps a trained head instead), unless
    the model is currently merged, in which case it is unmerged first (exact only to rounding,
    hence a warning). Raises ValueError for a model that is not patched, and (merge) for a
    base weight tied to another module.

    A quantized base (bitsandbytes 4-bit, QLoRA) is dequantized and merged in fp32, and the
    module becomes a full-precision ``nn.Linear`` in the dtype of the model's activations (its
    input embeddings'; the layer's compute dtype for a model without them), logged. The model then
    saves and loads the transformers way: with no quantized layer left it is no longer marked
    quantized, otherwise the merged layers are listed in its bitsandbytes config's
    ``llm_int8_skip_modules``. With ``requantize=True`` each becomes a 4-bit layer again instead, and
    each layer's requantization error ‖Q(W) − W‖/‖W‖ is logged (a merged model in 4-bit is not the
    trained one: the error says how far). ``requantize`` without ``merge``, or on a model without
    quantized layers, is an error.
    """
    state_of(model)
    layers = patching.adapted_modules(model)
    quantized = [(p, m) for p, m in layers if m.quantized is not None]
    if requantize and not (merge and quantized):
        raise ValueError("requantize=True applies to unpatch(merge=True) of a model with quantized (4-bit) layers")
    heads = getattr(state_of(model), "heads", None)
    if heads is not None and not merge:
        heads.check("unpatch without merge", model)  # before anything changes (heads.py: originals lost to to_empty)
    if merge:
        _refuse_shared(model, "unpatch(merge=True)")
        _refuse_offloaded(model, "unpatch(merge=True)")
        errors = {}
        dtype = hf.activation_dtype(model)
        for path, m in quantized:
            m.base_layer, errors[path] = m.merged_quantized_base(requantize, dtype)
        if quantized:
            if requantize:
                log.warning("peftkern: merged and requantized %d 4-bit layers; relative error ‖Q(W) − W‖/‖W‖ per "
                            "layer: %s", len(errors), ", ".join(f"{p} {e:.3g}" for p, e in errors.items()))
            else:
                stored = dtype or _compute_dtypes(quantized)
                log.warning("peftkern: merged %d quantized layers into full-precision layers (dequantized, merged "
                            "in fp32, stored in %s)", len(errors), str(stored).replace("torch.", ""))
        for _, m in layers:
            if m.quantized is None:
                m.merge()
    elif any(m.merged for _, m in layers):
        warnings.warn("unpatching a merged model: unmerging first, so base weights are restored to rounding, "
                      "not bit for bit", RuntimeWarning, stacklevel=2)
        for _, m in layers:
            m.unmerge()
    hf.unbind(model)
    model = patching.uncommit(model, keep_heads=merge)
    if merge and quantized and not requantize:
        hf.after_quantized_merge(model, [path for path, _ in quantized])
    return model


def _compute_dtypes(quantized) -> str:
    """The compute dtypes of quantized layers, named for a log line."""
    return "/".join(sorted({str(quant.compute_dtype(m.base_layer)).replace("torch.", "") for _, m in quantized}))


def merge(model: nn.Module) -> nn.Module:
    """Fold ΔW into every adapted base weight; forward then runs the base modules only.

    Raises ValueError, before any weight changes: for a model that is not patched; if an adapted
    weight is shared with another module (an LM head tied to the input embeddings): merging would
    change that module too; if a base layer is quantized (4-bit): ``unpatch(model, merge=True)``
    merges those into full-precision layers (or, with ``requantize=True``, back into 4-bit, reporting
    the error); or if a base weight is offloaded by accelerate (on the meta device), where ΔW would
    be lost."""
    state_of(model)
    _refuse_shared(model, "merge")
    _refuse_quantized(model)
    _refuse_offloaded(model, "merge")
    for _, m in patching.adapted_modules(model):
        m.merge()
    return model


def _refuse_offloaded(model: nn.Module, what: str) -> None:
    """A base weight on the meta device (accelerate's offload keeps it there, on disk or in CPU memory, and
    brings it in per forward) takes no merge: ΔW written into it would be lost, silently."""
    offloaded = [p for p, m in patching.adapted_modules(model) if m.base_layer.weight.is_meta]
    if offloaded:
        raise ValueError(f"cannot {what}: the base weight of {offloaded[0]} (and {len(offloaded) - 1} more) is on the "
                         "meta device (offloaded by accelerate's device_map, loaded only inside its forward), so ΔW "
                         "folded into it would be lost. Keep the adapter unmerged, save it (save_pretrained) and "
                         "merge on a model loaded without offloading, or load this one without offloading")


def _refuse_quantized(model: nn.Module) -> None:
    quantized = [(p, m.quantized) for p, m in patching.adapted_modules(model) if m.quantized is not None]
    if quantized:
        path, kind = quantized[0]
        back = ("; unpatch(model, merge=True, requantize=True) quantizes the merged weights back to 4-bit and logs "
                "each layer's error" if all(k == "4bit" for _, k in quantized) else
                " (requantizing is offered for 4-bit layers only)")
        raise ValueError(f"cannot merge into the {kind} quantized base of {path} (and {len(quantized) - 1} more): "
                         f"ΔW would be rounded away by the {kind} format. peftkern.unpatch(model, merge=True) merges "
                         f"into full-precision layers{back}")


def unmerge(model: nn.Module) -> nn.Module:
    """Take ΔW back out of the base weights merged by ``merge`` (exact to rounding); modules not
    merged are left alone, so on a model never merged it changes nothing. Raises ValueError for a
    model that is not patched."""
    state_of(model)
    for _, m in patching.adapted_modules(model):
        m.unmerge()
    return model


def _refuse_shared(model: nn.Module, what: str) -> None:
    shared = patching.shared_weights(model)
    if shared:
        path, others = next(iter(shared.items()))
        raise ValueError(
            f"cannot {what}: the base weight of {path} is also {', '.join(others)} (tied weights), so merging ΔW "
            f"into it would change that module too. Keep the adapter unmerged (its forward is exact), export it "
            f"with peftkern.export_peft, or untie the weights first (e.g. "
            f"model.{path}.base_layer.weight = torch.nn.Parameter(model.{path}.base_layer.weight.clone()), "
            f"and set config.tie_word_embeddings = False)")


def orthogonal_regularization(model: nn.Module, num_items_in_batch=None) -> Optional[torch.Tensor]:
    """The adapter's regulariser, weight included (AdaLoRA's orthogonality term, AdaLoRA eq. 4), or None.

    For custom loops that compute the loss themselves (a TRL trainer's ``compute_loss``); a model whose
    output carries ``loss`` already gets it added by a forward hook. Pass the ``num_items_in_batch``
    a ``compute_loss`` receives: the Trainer then sums the micro-batches' losses of a gradient
    accumulation window undivided, so the term comes once per optimizer step (None for the window's
    other micro-batches). Returns a scalar tensor on the adapter's device."""
    state = state_of(model)
    return state.regularization() if takes_regularization(state, num_items_in_batch) else None


def rank_pattern(model: nn.Module) -> Dict[str, List[bool]]:
    """{module path: [kept?] * init_r} of a rank-allocating method (adalora, hyper_adalora).

    Reads the device mask back (a host sync). Raises ValueError for a method without one."""
    state = state_of(model)
    pattern = state.rank_pattern()
    if pattern is None:
        raise ValueError(f"method {state.plan.method!r} has no rank pattern; only methods that allocate ranks "
                         "(adalora, hyper_adalora) have one")
    return pattern


def save(model: nn.Module, directory, peft: bool = True):
    """Write the adapter (and a trained head) to ``directory`` and return it as a Path: peftkern's
    native files (``peftkern_config.json`` + ``peftkern_model.safetensors``: the exact method, for
    ``load``) and, with ``peft``, the same ΔW as a standard PEFT LoRA adapter (``adapter_config.json``
    + ``adapter_model.safetensors``). Every file is written atomically. Raises ValueError, before a
    file is written: for a model that is not patched, if ``directory`` exists and is not a directory,
    if an adapted module's base weight was made trainable (no adapter file holds a module adapted and
    trained in full), or (PEFT files) if the model is merged."""
    return native_format.save(model, directory, peft=peft)


def load(model: nn.Module, directory, backend: str = "auto") -> nn.Module:
    """Patch an unpatched ``model`` with the adapter ``save`` (or ``save_pretrained``) wrote: the same
    method, options, factors, trained head and rank allocator. Raises FileNotFoundError / ValueError,
    before the model is modified, for missing, corrupt or misfitting files."""
    native_format.load(model, directory, backend)
    hf.bind(model)
    return model


def load_peft(model: nn.Module, directory, backend: str = "auto", *, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Patch ``model`` with a standard PEFT LoRA adapter (as ``lora``, trainable): per-module ranks
    and alphas, rsLoRA, dropout and ``modules_to_save`` are honoured; on a bf16/fp16 model the factors
    are fp32 unless ``autocast_adapter_dtype`` is False (``patch``'s option, PEFT's name). Raises
    FileNotFoundError / ValueError, before the model is modified, naming unknown or unsupported config
    fields and misfits."""
    peft_format.load_peft(model, directory, backend, autocast_adapter_dtype=autocast_adapter_dtype)
    hf.bind(model)
    return model


def methods() -> List[str]:
    """Names of the registered methods."""
    return _methods.names()


@dataclass
class Explanation:
    rows: List[Dict[str, Any]]
    method: str
    backends: Dict[str, Optional[str]]
    weights: str = ""  # the adapter's dtype, and the cast to the compute dtype when they differ

    def __str__(self) -> str:
        cols = ["module", "shape", "rank", "backend", "path", "A", "B", "u", "v", "merged"]
        if any("magnitude" in r for r in self.rows):
            cols.insert(-1, "magnitude")
        table = [[str(r.get(c, "")) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(cols)]
        lines = [f"peftkern: method {self.method!r}, {len(self.rows)} adapted modules"
                 + (f"; adapter weights {self.weights}" if self.weights else ""),
                 "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in table]
        avail = ", ".join(f"{k}: {'ok' if v is None else 'unavailable (' + v + ')'}" for k, v in self.backends.items())
        lines.append(f"backends: {avail}")
        return "\n".join(lines)

    __repr__ = __str__


def explain(model: nn.Module) -> Explanation:
    """Which backend and which code path each adapted module runs, and where its factors come from."""
    state = state_of(model)
    rows = []
    for path, m in patching.adapted_modules(model):
        device_type = m.base_layer.weight.device.type
        rank = state.plan.slot_rank(state.plan.slots[m.slot])
        ops = None
        try:
            ops = m.ops(device_type)
            backend, kernels = ops.name, ops.path_for(m.out_features, m.in_features, rank, m.base_layer.weight.dtype)
            note = state.backends.note(device_type, m.shape, m.base_fused)
            if note:
                backend += f" ({note})"
        except registry.BackendUnavailable as exc:
            backend, kernels = f"unavailable: {exc}", "-"
        f_group = state.factors(m.slot).group if device_type != "meta" else None
        form = "joint shrink+expand" if f_group else "fused adapter"
        if not f_group and ops is not None and ops.adapter_node is not None and state.dora is None:
            form += ", one C++ autograd node"  # functions.adapter's eager path for this backend
        if state.dora is not None:  # the one place DoRA's dataflow is named (layer.py, ops.functions.dora_adapter)
            form = ("DoRA: fused adapter with g = m/‖W0 + ΔW‖ folded into W0 and v (B without v) when the tokens "
                    f"number at least {functions.FOLD_MIN_ROWS_PER_FEATURE}× the input features, else a column scale "
                    "in one pass each way")
            if ops is not None and ops.dora_node is not None:
                form += ("; one C++ autograd node" + (" (a Python autograd Function while dropout applies, in "
                                                      "training)" if state.dropout() else ""))
        route = m.apart_route(ops, bool(f_group))  # the layer's own decision
        if route is not None:
            form, kernels = APART_TEXT[route].format(kind=m.quantized), f"{backend.split(' ')[0]} kernels"
        row = {"module": path, "shape": f"{m.in_features}->{m.out_features}", "rank": state.effective_rank(m.slot),
               "backend": backend, "requested": m.backend,
               "path": "merged (base only)" if m.merged else f"{form} ({kernels})",
               "merged": m.merged}
        if state.dora is not None:
            refresh = ("refreshed for every module of one shape together" if state.dora.batch_norms and not m.quantized
                       else "per module" if not state.dora.batch_norms else "per module (a quantized base)")
            above = None if ops is None else ops.merged_weight_above_rank
            merged = ("" if above is None else f"the merged weight's row norms where the {ops.name} merged path forms "
                      f"W0 + ΔW (rank > {above}, many rows) and g is not folded, else ")
            row["magnitude"] = (f"per module, trained; norm: {merged}the expansion in fp32 (fp64 for fp64 weights), "
                                "cached while W0, A, B, u, v are unchanged (g = m/norm also while m is), "
                                f"{refresh}")
        row.update(state.describe_slot(m.slot))
        rows.append(row)
    return Explanation(rows, state.plan.method, registry.availability(), _weights(model, state))


def _weights(model: nn.Module, state) -> str:
    """The adapter's dtype, said with the model's where they differ (``autocast_adapter_dtype``). Read
    from the tensors now, not the patch's plan: a model moved by ``.to(dtype)`` moves its adapter too."""
    own = {id(p) for p in state.parameters()}
    found = sorted({str(p.dtype).replace("torch.", "") for p in state.parameters() if p.is_floating_point()})
    if not found:
        return ""
    name = " and ".join(found)
    base = next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in own), None)
    if base is None or found == [str(base).replace("torch.", "")]:
        return f"in {name}, the model's dtype"
    return (f"in {name}, cast to {str(base).replace('torch.', '')} in each training forward and cached under "
            "no_grad (autocast_adapter_dtype)")


@dataclass(frozen=True)
class Counts:
    adapter_trainable: int  # what the papers' tables count
    adapter_total: int  # trainable + frozen adapter tensors (e.g. VeRA's shared A, B)
    trainable: int  # everything with requires_grad, heads included
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {pct:.4f} "
                f"|| adapter: {self.adapter_trainable:,} trained / {self.adapter_total:,}")


def count(model: nn.Module) -> Counts:
    """Parameter counts, as PEFT's ``print_trainable_parameters`` gives them (a packed 4-bit weight counts
    the values it holds, two per byte); works on meta-device models.
    ``total`` includes the frozen originals kept of ``modules_to_save`` (for ``disable_adapter``), as
    PEFT counts its ``original_module`` beside the trained copy. The trainable count equals PEFT's for
    every method, the total for LoRA and DoRA; VeRA's shared projections count here (PEFT keeps them as
    buffers), and PEFT's AdaLoRA adds a rank counter per module. Raises ValueError for a model that is
    not patched."""
    state = state_of(model)
    a_train = sum(p.numel() for p in state.parameters() if p.requires_grad)
    a_total = sum(p.numel() for p in state.parameters())
    originals = state.heads.numel() if getattr(state, "heads", None) is not None else 0
    return Counts(a_train, a_total, sum(p.numel() for p in model.parameters() if p.requires_grad),
                  sum(quant.parameter_count(p) for p in model.parameters()) + originals)


def parameter_table(model_or_config: Any, method: str = "lora", rank: Optional[int] = None, targets=None,
                    alpha: Optional[float] = None, **options: Any) -> str:
    """The trainable-parameter table of a method on a model, built on the meta device (no weights).

    ``model_or_config`` is a transformers config, a local model path, or an nn.Module
    (never modified: the table is computed on a fresh meta-device copy).
    """
    model = _meta_model(model_or_config)
    # a count does not depend on the training length (AdaLoRA's total_step): any valid one will do
    patch(model, method, rank, targets, alpha, **_methods.with_training_length(method, options, 10 ** 6))
    state = state_of(model)
    lines = [f"{method} (rank {state.plan.rank}, alpha {state.plan.alpha:g}) on {state.plan.model_type or type(model).__name__}",
             f"{'tensor':58s} {'shape':>16s} {'params':>12s}  trained"]
    for name, p in state.named_parameters():
        lines.append(f"{name:58s} {str(tuple(p.shape)):>16s} {p.numel():>12,d}  {'yes' if p.requires_grad else 'no'}")
    c = count(model)
    lines.append(f"adapter parameters trained: {c.adapter_trainable:,} (frozen: {c.adapter_total - c.adapter_trainable:,}); "
                 f"base model ({type(model).__name__}): {sum(p.numel() for p in model.parameters()) - c.adapter_total:,}")
    return "\n".join(lines)


def _meta_model(obj: Any) -> nn.Module:
    """A fresh meta-device model: the caller's model is never modified."""
    if isinstance(obj, nn.Module):
        if getattr(obj, "config", None) is None:  # a plain nn.Module: copy it to meta
            import copy

            clone = copy.deepcopy(obj)
            if is_patched(clone):
                patching.uncommit(clone, keep_heads=True)  # counted on meta: the heads' values do not matter
            return clone.to("meta")
        from transformers import PreTrainedModel

        if isinstance(obj, PreTrainedModel):
            with torch.device("meta"):  # its own class: a causal LM's head counts in the base
                return type(obj)(obj.config)
        obj = obj.config
    import transformers
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    config = obj if isinstance(obj, PretrainedConfig) else AutoConfig.from_pretrained(obj)
    # the class the checkpoint was saved as (with its head), else the bare backbone
    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), None)
    with torch.device("meta"):
        return cls(config) if cls is not None else AutoModel.from_config(config)
