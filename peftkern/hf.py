"""Saving the transformers way: ``save_pretrained``, ``Trainer.save_model`` and Trainer checkpoints.

A patched transformers model is still a ``PreTrainedModel``, and its users save it as one.
Left alone, ``save_pretrained`` would write the whole model with the base weights under
renamed keys (``q_proj.base_layer.weight``), which ``from_pretrained`` then reports missing
and initialises at random. So patching a ``PreTrainedModel`` binds, on that instance:

* ``model.save_pretrained(dir)`` -> ``peftkern.save``: the adapter alone (a few MB), as a
  PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, which
  ``peft.PeftModel.from_pretrained`` and transformers' ``model.load_adapter`` read into the
  plain base model) and peftkern's native files (``peftkern.load`` restores the exact
  method, the rank allocator's state included). ``Trainer.save_model`` and every
  ``save_steps`` checkpoint go through it. A merged, still-patched model refuses (unpatch
  it to save the merged full model under the original key names).
* ``Trainer(...).train(resume_from_checkpoint=dir)``: transformers' Trainer does not know
  adapter-only checkpoints of a model that is not a ``PeftModel``, so ``install_trainer_hook``
  wraps ``Trainer._load_from_checkpoint`` and ``_load_best_model`` (once per process, with
  a log line, when transformers' Trainer module is first imported): for a peftkern-patched
  model and a directory with peftkern's files they call
  ``native_format.restore``; for anything else they call transformers' own. The optimizer, scheduler,
  RNG and step counter are the Trainer's own checkpoint files, restored by the Trainer.

A quantized model (``is_quantized``, a bitsandbytes 4-bit base: QLoRA) is also marked as
carrying adapters (``_hf_peft_config_loaded``, the flag transformers' PEFT integration sets):
transformers' Trainer refuses to train a quantized model without one ("purely quantized"), and
that flag is how it recognises adapters attached outside a ``PeftModel``.

``unpatch`` removes the binding and the mark, so an unpatched model saves exactly as transformers does.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from . import native_format, patching, reference
from .factors import is_patched
from .health import unwrap
from .layer import AdaptedLinear
from .targets import is_adaptable

log = logging.getLogger("peftkern")

ATTR = "save_pretrained"
ADAPTERS_FLAG = "_hf_peft_config_loaded"  # transformers.integrations.peft: "this model carries adapters"


class SavePretrained:
    """``model.save_pretrained`` of a patched model (an object, not a closure: a deep copy of the
    model gets one bound to the copy)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: Any, is_main_process: bool = True, state_dict: Any = None,
                 **kwargs: Any) -> None:
        """Write the adapter to ``save_directory``. transformers' arguments are accepted: a given
        ``state_dict`` (a gathered full state dict, as the Trainer passes under FSDP or ZeRO-3) is
        where the adapter's values are read; ``is_main_process`` says whether this process writes
        (a model sharded with FSDP2 is gathered first, on every rank). PEFT's ``save_embedding_layers``
        ("auto", True or False) and ``selected_adapters`` (None or ["default"]) are honoured; sharding
        options (``max_shard_size``, ``save_peft_format``, ``save_original_format``) do not apply to an
        adapter and are ignored. Raises, before a file is written, ValueError for ``push_to_hub=True``,
        ``safe_serialization=False``, a ``variant``, ``distributed_checkpoint=True``, another adapter
        name, a merged model or one that also carries a PEFT adapter; TypeError for any other argument."""
        embedding_layers = _save_options(kwargs)
        if any(m.merged for _, m in patching.adapted_modules(self.model)):
            raise ValueError("save_pretrained on a merged, still-patched model: to save the merged full model, "
                             "call peftkern.unpatch(model, merge=True) and then model.save_pretrained(dir); to save "
                             "the adapter, call peftkern.unmerge(model) first")
        check_no_peft_layers(self.model)
        if native_format.save(self.model, Path(save_directory), state_dict=state_dict, is_main_process=is_main_process,
                              save_embedding_layers=embedding_layers) is not None:
            log.info("peftkern: saved the adapter (PEFT LoRA + native files) to %s", save_directory)


IGNORED_SAVE_OPTIONS = ("max_shard_size", "token", "save_peft_format", "save_original_format")


def _save_options(kwargs: dict) -> bool:
    """Check ``save_pretrained``'s other arguments (SavePretrained.__call__); return save_embedding_layers."""
    refused = {"push_to_hub": (True, "upload the saved directory with huggingface_hub's upload_folder"),
               "safe_serialization": (False, "peftkern writes safetensors only, which PEFT and transformers read"),
               "distributed_checkpoint": (True, "the adapter is gathered and written whole (a few MB)")}
    for name, (bad, why) in refused.items():
        if kwargs.pop(name, not bad) == bad:
            raise ValueError(f"save_pretrained({name}={bad}) is not supported on a peftkern-patched model: {why}")
    if kwargs.pop("variant", None) is not None:
        raise ValueError("save_pretrained(variant=...) is not supported on a peftkern-patched model: the adapter "
                         "files have PEFT's fixed names")
    selected = kwargs.pop("selected_adapters", None)
    if selected is not None and list(selected) != ["default"]:
        raise ValueError(f"selected_adapters={selected!r}: a peftkern-patched model has one adapter, 'default' "
                         "(PEFT's name for it); pass None or ['default']")
    embedding_layers = kwargs.pop("save_embedding_layers", "auto")
    if embedding_layers not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers={embedding_layers!r}: choose 'auto', True or False (PEFT's values)")
    unknown = sorted(k for k in kwargs if k not in IGNORED_SAVE_OPTIONS)
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected keyword argument(s) {unknown} (a peftkern-patched model "
                        "saves its adapter: save_directory, is_main_process, state_dict, save_embedding_layers, "
                        f"selected_adapters; ignored: {', '.join(IGNORED_SAVE_OPTIONS)})")
    return embedding_layers is not False


def check_no_peft_layers(model: nn.Module) -> None:
    """Raise ValueError where PEFT's own adapter layers were added to a patched model (transformers'
    ``load_adapter`` or ``PeftModel`` over it): saving would write peftkern's adapter alone and lose them."""
    stacked = [name for name, m in model.named_modules()
               if type(m).__module__.startswith("peft.tuners.") and name and not isinstance(m, AdaptedLinear)]
    if stacked:
        raise ValueError(f"this model carries PEFT adapter layers ({', '.join(stacked[:3])}{' …' if len(stacked) > 3 else ''}) "
                         "beside peftkern's adapter, which one file cannot hold: one adapter per model. Load a PEFT "
                         "adapter onto an unpatched model with peftkern.load_peft(model, dir) instead")


class _RefuseSecondAdapter:
    """transformers' ``load_adapter`` / ``add_adapter`` on a patched model: refused (one adapter per model),
    where transformers would stack PEFT's layers on peftkern's and a later save would drop them."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(f"model.{self.name}() on a peftkern-patched model: one adapter per model, and "
                         "transformers would stack PEFT's layers on peftkern's. To load a PEFT adapter, call "
                         "peftkern.load_peft(model, dir) on the unpatched model (peftkern.unpatch(model) first); "
                         "for peftkern's own files, peftkern.load(model, dir)")


ADAPTER_METHODS = ("load_adapter", "add_adapter")


def is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
               for cls in type(model).__mro__)


def bind(model: nn.Module) -> None:
    """After patching: route ``save_pretrained`` and the Trainer's checkpoint loading through peftkern."""
    if not is_transformers_model(model):
        return
    setattr(model, ATTR, SavePretrained(model))
    for name in ADAPTER_METHODS:
        setattr(model, name, _RefuseSecondAdapter(name))
    if getattr(model, "is_quantized", False) and not getattr(model, ADAPTERS_FLAG, False):
        setattr(model, ADAPTERS_FLAG, True)
        model._peftkern_marked_adapters = True
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, AdaptedLinear) and "_peftkern_fused_head_guard" not in model.__dict__:
        model._peftkern_fused_head_guard = model.register_forward_pre_hook(_refuse_fused_head, with_kwargs=True)
    when_imported(TRAINER_MODULE, install_trainer_hook)
    when_imported(DPO_MODULE, install_dpo_hook)


def _refuse_fused_head(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """TRL's trainers (SFT, DPO) patch the model's forward with a fused LM head, called with
    ``fused_lm_head=True``, that multiplies the hidden states by ``lm_head.weight`` directly: an adapter on
    the LM head would be left out of the loss and never train. TRL refuses that for a PeftModel; so do we."""
    if kwargs.get("fused_lm_head"):
        raise ValueError("the output head (lm_head) carries an adapter, which TRL's fused LM head (fused_lm_head=True, "
                         "the loss of SFTTrainer and DPOTrainer) leaves out: it computes the log-probabilities from "
                         "lm_head.weight directly, so the adapter would never train. Patch without 'lm_head' in targets, "
                         "or train the head in full with modules_to_save=['lm_head']")


TRAINER_MODULE = "transformers.trainer"
DPO_MODULE = "trl.trainer.dpo_trainer"


def when_imported(name: str, hook) -> None:
    """Run ``hook`` now if module ``name`` (a trainer's) is imported, else right after it is. Importing it
    ourselves would cost every patch() seconds and ~90 MB (transformers' Trainer imports datasets and the
    rest of the training stack; 87 MB of RSS measured) for users who never build a trainer; a trainer
    cannot exist before its module."""
    if name in sys.modules:
        hook()
        return
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, hook))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``name`` it asks the other finders and wraps the loader so that ``hook``
    runs once the module has executed (the usual post-import hook; removed after it fires)."""

    def __init__(self, name: str, hook):
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _HookedLoader(spec.loader, self.hook)
        return spec


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.hook()


def install_dpo_hook() -> None:
    """TRL's ``DPOTrainer(model, ref_model=None)`` takes its reference from the adapter only for a
    ``PeftModel`` (an isinstance check); for any other model it loads a second copy of the base from
    ``model.config``'s path, in full precision even for a 4-bit policy, and says nothing. For a patched
    model it gets ``peftkern.reference_model(model)`` instead, with a log line: the policy as it is,
    frozen, as TRL's reference for a PeftModel. Wrapped once per process."""
    from trl.trainer import dpo_trainer

    cls = dpo_trainer.DPOTrainer
    if getattr(cls.__init__, "_peftkern", False):
        return
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, model, ref_model=None, *args, **kwargs):
        inner = unwrap(getattr(model, "module", model)) if isinstance(model, nn.Module) else None
        config = kwargs.get("args", args[0] if args else None)
        if (getattr(config, "sync_ref_model", False) and (isinstance(ref_model, reference.ReferenceModel)
                                                          or (ref_model is None and inner is not None and is_patched(inner)))):
            # TRL's sync callback mixes the reference's parameters into the policy's; ours has none of its own
            raise ValueError("sync_ref_model=True needs a reference model with parameters of its own, and peftkern's "
                             "reference shares the policy's (as TRL refuses it for a PeftModel's): pass a separate "
                             "ref_model, or set sync_ref_model=False")
        if ref_model is None and inner is not None and is_patched(inner):
            ref_model = reference.reference_model(inner)
            log.info("peftkern: DPOTrainer's reference model is the patched policy as it is now, frozen "
                     "(peftkern.reference_model), as TRL makes it for a PeftModel; pass ref_model to choose another")
        init(self, model, ref_model, *args, **kwargs)

    __init__._peftkern = True
    cls.__init__ = __init__


def unbind(model: nn.Module) -> None:
    if isinstance(model.__dict__.get(ATTR), SavePretrained):
        delattr(model, ATTR)
    for name in ADAPTER_METHODS:
        if isinstance(model.__dict__.get(name), _RefuseSecondAdapter):
            delattr(model, name)
    if model.__dict__.pop("_peftkern_marked_adapters", False):
        model.__dict__.pop(ADAPTERS_FLAG, None)
    guard = model.__dict__.pop("_peftkern_fused_head_guard", None)
    if guard is not None:
        guard.remove()


def activation_dtype(model: nn.Module):
    """The dtype of the activations between a transformers model's layers (its input embeddings'),
    or None: what a quantized layer merged into a plain Linear must take, since the 4-bit layer
    cast its input to its compute dtype and its output back, and a plain Linear does not."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embed = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embed, "weight", None)
    return weight.dtype if weight is not None and weight.is_floating_point() else None


def after_quantized_merge(model: nn.Module, merged: list) -> None:
    """After ``unpatch(merge=True)`` turned the quantized layers at the paths ``merged`` into plain
    Linears: make ``save_pretrained`` + ``from_pretrained`` give them back as such. With no quantized
    layer left, the model stops being quantized (transformers' own ``dequantize()`` does this);
    otherwise every full-precision Linear (the merged ones, the output embedding) is listed in
    ``llm_int8_skip_modules`` of its bitsandbytes config, which transformers reads to leave those
    Linears unquantized when it loads the checkpoint."""
    from . import quant

    if not is_transformers_model(model) or not merged:
        return
    config = getattr(model.config, "quantization_config", None)
    if any(quant.kind(m) for m in model.modules()):
        if config is None:
            return
        # every Linear that is full precision now, not only the merged ones: a given list replaces
        # transformers' default one (the output embedding), which would then be quantized on load
        plain = [name for name, m in model.named_modules() if is_adaptable(m) and not quant.kind(m)]
        if isinstance(config, dict):
            have = config.get("llm_int8_skip_modules") or []
            config["llm_int8_skip_modules"] = [*have, *(n for n in plain if n not in have)]
        else:
            have = getattr(config, "llm_int8_skip_modules", None) or []
            config.llm_int8_skip_modules = [*have, *(n for n in plain if n not in have)]
        log.info("peftkern: the merged layers stay full precision when the saved model is loaded again "
                 "(llm_int8_skip_modules of its quantization config)")
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    else:
        if config is not None:
            del model.config.quantization_config
        model.__dict__["is_quantized"] = False
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    log.info("peftkern: no quantized layer is left; the model is no longer marked quantized and saves as an "
             "ordinary checkpoint")


def _restorable(model: Any, directory: Any) -> bool:
    inner = unwrap(getattr(model, "module", model))
    if directory is None or not is_patched(inner):
        return False
    try:
        native_format.native_files(Path(directory))
    except (FileNotFoundError, ValueError):
        return False
    return True


def install_trainer_hook() -> None:
    """Wrap transformers' Trainer checkpoint loading, once per process (module docstring)."""
    from transformers import trainer as hf_trainer

    cls = hf_trainer.Trainer
    if getattr(cls._load_from_checkpoint, "_peftkern", False):
        return
    load_from_checkpoint, load_best = cls._load_from_checkpoint, cls._load_best_model

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.model if model is None else model
        if not _restorable(target, resume_from_checkpoint):
            return load_from_checkpoint(self, resume_from_checkpoint, model)
        native_format.restore(unwrap(getattr(target, "module", target)), Path(resume_from_checkpoint))
        log.info("peftkern: restored the adapter from %s", resume_from_checkpoint)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if not _restorable(self.model, best):
            return load_best(self)
        native_format.restore(unwrap(self.model), Path(best))
        log.info("peftkern: loaded the best adapter from %s", best)

    _load_from_checkpoint._peftkern = _load_best_model._peftkern = True
    cls._load_from_checkpoint, cls._load_best_model = _load_from_checkpoint, _load_best_model
    log.info("peftkern: transformers.Trainer resumes peftkern adapter checkpoints (peftkern.hf)")


__all__ = ["SavePretrained", "bind", "unbind", "install_trainer_hook", "is_transformers_model"]
