"""Persistence: ``save``/``load`` of a peftkern adapter (the exact method, for further training).

A saved adapter is a directory. ``save`` writes two native files:

* ``peftkern_model.safetensors``: the adapter state's tensors (``state.tensors_for_save()``,
  stored under ``peftkern.<key>``, their names in the patched model) plus every parameter
  trained outside the adapter (the task head), under its model name.
* ``peftkern_config.json``: the method, public rank, alpha, options, targets, each slot's
  path and shape, ``state.extra_config()``, the names of the saved head parameters, the
  SHA-256 of the tensor file and the peftkern version.

and, next to them, the same adapter as a standard PEFT LoRA adapter (``adapter_config.json``
+ ``adapter_model.safetensors``, ``peft_format.export_peft``), so one directory serves
``peftkern.load``, ``peft.PeftModel.from_pretrained`` and transformers' ``load_adapter``.
Directories written before the native files had their own names (``adapter_config.json``
with ``"format": "peftkern"``) still load.

``load`` validates everything (files, JSON, tensor file, method, slot paths and shapes,
the method's own ``load_saved`` check, head shapes) against a state built off to the
side, and only then patches the model: a bad file never leaves a half-patched model.

Writes are atomic: each file goes to a temporary file in the same directory, is fsynced
and then ``os.replace``d over the old one, tensors first and config last. A crash while
either is written leaves the previous adapter intact. The config carries the tensor
file's SHA-256, so the one torn state left (a crash between the two renames) is
detected at load instead of silently pairing new tensors with an old config.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import dist, health, patching, snapshot
from .factors import STATE_ATTR, Plan, state_of
from .files import atomic_write, json_default, read_json_object, remove_stale, safetensors_bytes
from .peft_format import write_peft
from .version import __version__

CONFIG_NAME = "peftkern_config.json"
WEIGHTS_NAME = "peftkern_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"  # PEFT's names; the native files used them before
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "peftkern"
STATE_PREFIX = STATE_ATTR + "."  # the state's tensors keep their names in the patched model
ALLOCATOR_PREFIX = "allocator."  # a rank allocator's buffers (EMA scores), for an exact resume

PathLike = Union[str, os.PathLike]
Tensor = torch.Tensor


# --- save -------------------------------------------------------------------------------------


def save(model: nn.Module, directory: PathLike, peft: bool = True, state_dict: Optional[Mapping[str, Tensor]] = None,
         is_main_process: Optional[bool] = None, save_embedding_layers: bool = True) -> Optional[Path]:
    """Write the adapter of a patched ``model`` (and its trained head) to ``directory``: the native
    files, and with ``peft`` (default) the same ΔW as a PEFT LoRA adapter next to them.

    ``state_dict``: a gathered full state dict of the model (what the Trainer hands over under FSDP
    or DeepSpeed ZeRO-3); the adapter's values are read from it. A model sharded with FSDP2 is
    gathered instead, which every rank must take part in (snapshot.py). ``is_main_process``: whether
    this process writes; by default rank 0 of a running process group, else every caller.
    ``save_embedding_layers``: as ``export_peft``'s (the PEFT files only).

    Raises ValueError if ``directory`` exists and is not a directory, or (PEFT files) if the
    model is merged. Every file is written atomically; returns the directory, or None where this
    process does not write."""
    snap = snapshot.take(model, state_dict)
    if is_main_process is None:
        is_main_process = dist.is_main_process()
    if not is_main_process:
        return None
    write_native(model, directory, snap)
    if not peft or write_peft(model, directory, skip_empty=True, snapshot=snap,
                              save_embedding_layers=save_embedding_layers) is None:
        remove_stale(Path(directory), (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME), "peftkern adapter")
    return Path(directory)


def write_native(model: nn.Module, directory: PathLike, snap: Optional[snapshot.Snapshot] = None) -> Path:
    """The native files alone (``save`` without the PEFT adapter)."""
    snap = snap or snapshot.take(model)
    state = snap.state
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save to {str(directory)!r}: it exists and is not a directory")
    tensors = {STATE_PREFIX + k: t for k, t in state.tensors_for_save().items()}
    heads = snap.heads(model)
    tensors.update(heads)
    allocator = state.rank_allocator()
    counters = None
    if allocator is not None:  # the EMA scores are optimizer-side state: PEFT drops them, a resume needs them
        ckpt = allocator.checkpoint()
        tensors.update({ALLOCATOR_PREFIX + k: v for k, v in ckpt["buffers"].items()})
        counters = {"global_step": ckpt["global_step"], "total_step": ckpt["total_step"]}
    payload = safetensors_bytes(tensors)
    config = {
        "format": FORMAT,
        "peftkern_version": _version(),
        **state.plan.describe(),
        "rank": state.plan.requested_rank,  # patch()'s rank as given, so that load can plan exactly the same
        "size_rank": state.plan.rank,
        "slots": [{"path": s.path, "in_features": s.in_features, "out_features": s.out_features}
                  for s in state.plan.slots],
        "blocks": _block_count(model),
        "extra": state.extra_config(),
        "heads": sorted(heads),
        "allocator": counters,
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
    }
    text = json.dumps(config, indent=2, sort_keys=True, default=json_default) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, payload)  # tensors first ...
    atomic_write(directory / CONFIG_NAME, text.encode())  # ... config last
    return directory


# --- load -------------------------------------------------------------------------------------


def load(model: nn.Module, directory: PathLike, backend: str = "auto") -> nn.Module:
    """Patch ``model`` with the adapter saved in ``directory`` and return it.

    Raises (FileNotFoundError, ValueError) before the model is modified if the files are
    missing, corrupt or truncated, or do not fit this model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    config = read_config(directory)
    tensors = _read_tensors(directory, config)
    plan = _plan_from_config(model, config, backend)
    health.check_placement(model, plan.device, plan.model_dtype or plan.dtype, [s.path for s in plan.slots])
    state = patching.build(plan)
    apply = _load_into(model, state, config, tensors)  # raises, naming the first misfit, before any change
    patching.commit(model, state, fresh=False)
    apply()
    return model


def restore(model: nn.Module, directory: PathLike) -> nn.Module:
    """Put the adapter saved in ``directory`` into ``model``, which is already patched with the same
    method, options and modules (a freshly patched model resuming a run, as the transformers
    Trainer does from a checkpoint). Restores the factors, the head and a rank allocator's state.

    Raises ValueError, before anything changes, naming the first setting or tensor that differs."""
    state = state_of(model)
    if any(dist.is_shard(p) for p in state.parameters()):
        # a review's finding: the load failed half way, "mixed torch.Tensor and DTensor"
        raise ValueError("this model's adapter is sharded by FSDP2 (fully_shard): restore the adapter before "
                         "sharding, or load a distributed checkpoint with torch.distributed.checkpoint")
    directory = Path(directory)
    config = read_config(directory)
    tensors = _read_tensors(directory, config)
    saved = {k: config.get(k) for k in ("method", "size_rank", "alpha", "options", "dropout", "use_rslora",
                                         "rank_pattern", "alpha_pattern", "use_dora")}
    here = json.loads(json.dumps({**state.plan.describe(), "size_rank": state.plan.rank}, default=json_default))
    differ = [k for k, v in saved.items() if v is not None and here.get(k) != v]
    paths = [s["path"] for s in config["slots"]]
    if paths != [s.path for s in state.plan.slots]:
        differ.append("slots")
    if differ:
        k = differ[0]
        raise ValueError(f"{str(directory)!r} was saved with {k}={saved.get(k, paths)!r}, but this model is patched "
                         f"with {k}={here.get(k, [s.path for s in state.plan.slots])!r}; patch it the same way, or "
                         "use peftkern.load on an unpatched model")
    # TRL casts a quantized model's trainable parameters to bf16 by `.data`; train() puts them back, but a
    # resuming Trainer loads its optimizer state before that, and torch casts the state to the parameters'
    # dtype (AdamW then failed on fp32 parameters with bf16 moments: a review's finding). Put them back now.
    state.keep_dtypes()
    _load_into(model, state, config, tensors)()
    return model


def _load_into(model: nn.Module, state, config: Dict[str, Any], tensors: Dict[str, torch.Tensor]):
    """Check the saved tensors against ``state`` and the model's head (raising before any change),
    load the adapter's into the state, and return the function that copies the rest (the head
    and the allocator's state), to be called once the state is committed."""
    adapter = {k[len(STATE_PREFIX):]: t for k, t in tensors.items() if k.startswith(STATE_PREFIX)}
    scores = {k[len(ALLOCATOR_PREFIX):]: t for k, t in tensors.items() if k.startswith(ALLOCATOR_PREFIX)}
    heads = {k: t for k, t in tensors.items() if not k.startswith((STATE_PREFIX, ALLOCATOR_PREFIX))}
    if sorted(heads) != sorted(config.get("heads", [])):
        raise ValueError(f"{WEIGHTS_NAME} holds head tensors {sorted(heads)} but {CONFIG_NAME} lists "
                         f"{sorted(config.get('heads', []))}")
    head_params = _check_heads(model, heads)
    allocator, counters = state.rank_allocator(), config.get("allocator")
    if allocator is not None and counters:
        own = dict(allocator.named_buffers())
        bad = sorted(set(scores) ^ set(own)) or [k for k in scores if tuple(scores[k].shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"the adapter's allocator state does not fit this model (first misfit: {bad[0]!r})")
    state.load_saved(adapter, config.get("extra", {}))

    def rest() -> None:
        with torch.no_grad():
            for name, t in heads.items():
                head_params[name].copy_(t)
                head_params[name].requires_grad_(True)
        if allocator is not None and counters:
            allocator.restore({**counters, "buffers": scores})

    return rest


def native_files(directory: Path) -> Tuple[Path, Path]:
    """(config, tensors) of the native adapter in ``directory``: the current names, or the names
    of directories saved before the PEFT files shared them (adapter_config.json with format peftkern)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {str(directory)!r}")
    if (directory / CONFIG_NAME).is_file():
        return directory / CONFIG_NAME, directory / WEIGHTS_NAME
    old = directory / PEFT_CONFIG_NAME
    if old.is_file():
        try:
            is_ours = json.loads(old.read_text(encoding="utf-8")).get("format") == FORMAT
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            is_ours = False
        if is_ours:
            return old, directory / PEFT_WEIGHTS_NAME
        raise ValueError(f"{str(directory)!r} holds a PEFT adapter but no {CONFIG_NAME}: load it with "
                         "peftkern.load_peft(model, directory) (or peft.PeftModel.from_pretrained)")
    raise FileNotFoundError(f"{str(directory / CONFIG_NAME)!r} is missing: not a saved peftkern adapter")


def read_config(directory: Path) -> Dict[str, Any]:
    """Parse and check the native config; a PEFT-only directory is named as such."""
    path, _ = native_files(directory)
    config = read_json_object(path)
    if config.get("format") != FORMAT:
        hint = ("it is a PEFT adapter: load it with peft.PeftModel.from_pretrained"
                if "peft_type" in config else "its 'format' field is missing or wrong")
        raise ValueError(f"{str(path)!r} is not a peftkern adapter config: {hint}")
    missing = [k for k in ("method", "rank", "alpha", "options", "slots") if k not in config]
    if missing:
        raise ValueError(f"{str(path)!r} lacks the field(s) {missing}; the file is corrupt")
    return config


def _read_tensors(directory: Path, config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    path = native_files(directory)[1]
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: the adapter has a config but no tensors")
    payload = path.read_bytes()
    digest = config.get("weights_sha256")
    if digest is not None and hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError(f"{str(path)!r} does not match the checksum in {CONFIG_NAME}: the file is truncated or "
                         "corrupt, or a save was interrupted between writing the tensors and the config")
    try:
        return st_load(payload)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (corrupt or truncated): {exc}") from exc


def _plan_from_config(model: nn.Module, config: Dict[str, Any], backend: str) -> Plan:
    if not isinstance(config["options"], dict):
        raise ValueError(f"{CONFIG_NAME}: 'options' must be an object, got {config['options']!r}")
    saved = config["slots"]
    paths = [s["path"] for s in saved]
    names = {name for name, _ in model.named_modules()}
    if paths and not any(path in names for path in paths):  # another architecture: say that, not a block count
        raise ValueError(f"none of the adapter's {len(paths)} modules exists in this model (the first: {paths[0]!r}): "
                         "it was saved for another architecture")
    blocks = config.get("blocks")  # checked next: a smaller model lacks the deep blocks' modules too
    if blocks is not None and blocks != _block_count(model):
        raise ValueError(f"the adapter was saved for a model with {blocks} blocks; this one has {_block_count(model)}")
    common = dict(dropout=config.get("dropout", 0.0), use_rslora=config.get("use_rslora", False),
                  rank_pattern={re.escape(k): v for k, v in config.get("rank_pattern", {}).items()},
                  alpha_pattern={re.escape(k): v for k, v in config.get("alpha_pattern", {}).items()},
                  modules_to_save=config.get("modules_to_save"), use_dora=bool(config.get("use_dora", False)),
                  # saved before the option existed: the adapter then had the model's dtype
                  autocast_adapter_dtype=bool(config.get("autocast_adapter_dtype", False)))
    p = patching.plan(model, config["method"], config["rank"], paths, config["alpha"], backend, **common,
                      **config["options"])
    if [s.path for s in p.slots] != paths:
        raise ValueError(f"the adapter's modules {paths[:3]}... are not the modules this model has under those names")
    for want, got in zip(saved, p.slots):
        if (want["in_features"], want["out_features"]) != (got.in_features, got.out_features):
            raise ValueError(f"module {got.path} is {got.in_features}->{got.out_features} in this model but the "
                             f"adapter was saved for {want['in_features']}->{want['out_features']}")
    if "size_rank" in config and config["size_rank"] != p.rank:
        raise ValueError(f"the adapter's factors have rank {config['size_rank']} but {config['method']!r} at rank "
                         f"{config['rank']} builds rank {p.rank}")
    return p


def _check_heads(model: nn.Module, heads: Dict[str, torch.Tensor]) -> Dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    out = {}
    for name, t in sorted(heads.items()):
        if name not in params:
            raise ValueError(f"the adapter saves head parameter {name!r}, which this model does not have")
        if tuple(params[name].shape) != tuple(t.shape):
            raise ValueError(f"head parameter {name!r} has shape {tuple(t.shape)} in the adapter but "
                             f"{tuple(params[name].shape)} in this model (a different number of labels?)")
        out[name] = params[name]
    return out


def _block_count(model: nn.Module) -> int:
    """Length of the model's repeated blocks (its largest ModuleList), the adapter's own lists excluded."""
    state = getattr(model, STATE_ATTR, None)
    own = {id(m) for m in state.modules()} if isinstance(state, nn.Module) else set()
    return max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList) and id(m) not in own), default=0)


def _version() -> str:
    return __version__


__all__ = ["save", "write_native", "load", "read_config", "native_files", "CONFIG_NAME", "WEIGHTS_NAME",
           "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME"]
