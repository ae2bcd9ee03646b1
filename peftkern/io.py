"""Persistence: ``save``/``load`` of a peftkern adapter, and ``export_peft`` to a standard PEFT LoRA.

A saved adapter is a directory with two files:

* ``adapter_model.safetensors``: the adapter state's tensors (``state.tensors_for_save()``,
  stored under ``peftkern.<key>``, their names in the patched model) plus every parameter
  trained outside the adapter (the sequence-classification head), under its model name.
* ``adapter_config.json``: the method, public rank, alpha, options, targets, each slot's
  path and shape, ``state.extra_config()``, the names of the saved head parameters, the
  SHA-256 of the tensor file and the peftkern version.

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

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import health, patching
from .factors import AdapterState, Plan
from .targets import is_transposed

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "peftkern"
STATE_PREFIX = patching.STATE_ATTR + "."  # the state's tensors keep their names in the patched model
PEFT_PREFIX = "base_model.model."

PathLike = Union[str, os.PathLike]

# transformers head class suffix -> PEFT task_type (None: PEFT's plain PeftModel)
_PEFT_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)  # anything else (ambiguous ones such as *ForConditionalGeneration included) loads as a plain PeftModel


# --- save -------------------------------------------------------------------------------------


def save(model: nn.Module, directory: PathLike) -> Path:
    """Write the adapter of a patched ``model`` (and its trained head) to ``directory``."""
    state = patching.state_of(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save to {str(directory)!r}: it exists and is not a directory")
    tensors = {STATE_PREFIX + k: t for k, t in state.tensors_for_save().items()}
    heads = trained_outside_adapter(model)
    tensors.update(heads)
    payload = _safetensors_bytes(tensors)
    config = {
        "format": FORMAT,
        "peftkern_version": _version(),
        **state.plan.describe(),
        "rank": requested_rank(state.plan),
        "size_rank": state.plan.rank,
        "slots": [{"path": s.path, "in_features": s.in_features, "out_features": s.out_features}
                  for s in state.plan.slots],
        "blocks": _block_count(model),
        "extra": state.extra_config(),
        "heads": sorted(heads),
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
    }
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, payload)  # tensors first ...
    atomic_write(directory / CONFIG_NAME, text.encode())  # ... config last
    return directory


def trained_outside_adapter(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every trainable parameter that the adapter state does not own (the task head), by model name.

    Found by identity against the state's parameters and by ``requires_grad``, never by name.
    """
    own = {id(p) for p in patching.state_of(model).parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and id(p) not in own}


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:  # makes the rename itself durable; not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _safetensors_bytes(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save as st_save

    # own contiguous CPU copies: safetensors refuses tensors that share memory (tied views)
    return st_save({k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()},
                   metadata={"format": "pt", **(metadata or {})})


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
    health.check_placement(model, plan.device, plan.dtype, [s.path for s in plan.slots])
    state = patching.build(plan)
    adapter = {k[len(STATE_PREFIX):]: t for k, t in tensors.items() if k.startswith(STATE_PREFIX)}
    heads = {k: t for k, t in tensors.items() if not k.startswith(STATE_PREFIX)}
    if sorted(heads) != sorted(config.get("heads", [])):
        raise ValueError(f"{WEIGHTS_NAME} holds head tensors {sorted(heads)} but {CONFIG_NAME} lists "
                         f"{sorted(config.get('heads', []))}")
    head_params = _check_heads(model, heads)
    state.load_saved(adapter, config.get("extra", {}))  # raises, naming the first misfit, before any change
    patching.commit(model, state, backend)
    with torch.no_grad():
        for name, t in heads.items():
            head_params[name].copy_(t)
            head_params[name].requires_grad_(True)
    return model


def read_config(directory: Path) -> Dict[str, Any]:
    """Parse and check ``adapter_config.json``; a PEFT adapter is named as such."""
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {str(directory)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: not a saved peftkern adapter")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
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

    path = directory / WEIGHTS_NAME
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
    p = patching.plan(model, config["method"], config["rank"], paths, config["alpha"], backend, **config["options"])
    if [s.path for s in p.slots] != paths:
        raise ValueError(f"the adapter's modules {paths[:3]}... are not the modules this model has under those names")
    for want, got in zip(saved, p.slots):
        if (want["in_features"], want["out_features"]) != (got.in_features, got.out_features):
            raise ValueError(f"module {got.path} is {got.in_features}->{got.out_features} in this model but the "
                             f"adapter was saved for {want['in_features']}->{want['out_features']}")
    blocks = config.get("blocks")
    if blocks is not None and blocks != _block_count(model):
        raise ValueError(f"the adapter was saved for a model with {blocks} blocks; this one has {_block_count(model)}")
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


def requested_rank(plan: Plan) -> Optional[int]:
    """The public ``rank`` that ``patch`` was given (None: the default), so that load can
    call ``patching.plan`` exactly as the original patch did."""
    return plan.requested_rank


def _block_count(model: nn.Module) -> int:
    """Length of the model's repeated blocks (its largest ModuleList), the adapter's own lists excluded."""
    state = getattr(model, patching.STATE_ATTR, None)
    own = {id(m) for m in state.modules()} if isinstance(state, nn.Module) else set()
    return max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList) and id(m) not in own), default=0)


# --- export to PEFT ---------------------------------------------------------------------------


def export_peft(model: nn.Module, directory: PathLike) -> Path:
    """Write the adapter as a standard PEFT LoRA adapter that gives exactly the same ΔW.

    Per module, lora_A = u⊙A [r, K] and lora_B = s·(v⊙B) [N, r] with lora_alpha = r, so
    PEFT's scaling is 1. Components whose u entry is zero in a method that reports a
    smaller effective rank (AdaLoRA's pruned triplets) are dropped, with the module's
    rank in ``rank_pattern``; a module with nothing left is not exported (its ΔW is 0).
    Parameters trained outside the adapter (the classification head) go to
    ``modules_to_save``. peft itself is not needed to write this.
    """
    state = patching.state_of(model)
    merged = [p for p, m in patching.adapted_modules(model) if m.merged]
    if merged:
        raise ValueError(f"cannot export a merged model (merged: {merged[:3]}); call peftkern.unmerge(model) first, "
                         "so that the exported adapter applies to the original base weights")
    plan = state.plan
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    transposed = False
    modules = dict(model.named_modules())
    with torch.no_grad():
        for slot in plan.slots:
            lora_a, lora_b = peft_factors(state, slot.index)
            if lora_a.shape[0] == 0:
                continue
            tensors[f"{PEFT_PREFIX}{slot.path}.lora_A.weight"] = lora_a
            tensors[f"{PEFT_PREFIX}{slot.path}.lora_B.weight"] = lora_b
            ranks[slot.path] = lora_a.shape[0]
            transposed = transposed or is_transposed(modules[slot.path].base_layer)
    if not ranks:
        raise ValueError("nothing to export: every adapted module has effective rank 0 (ΔW = 0)")
    heads = trained_outside_adapter(model)
    head_modules = sorted({name.rpartition(".")[0] for name in heads})
    for module_path in head_modules:
        for pname, t in modules[module_path].state_dict().items():
            tensors[f"{PEFT_PREFIX}{module_path}.{pname}"] = t
    pattern = {re.escape(path): r for path, r in ranks.items() if r != plan.rank}
    config = _peft_config(model, plan, sorted(ranks), pattern, head_modules, transposed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Provenance goes in the safetensors header, which PEFT ignores; in adapter_config.json
    # an unknown key makes peft warn on every load.
    provenance = {"peftkern": json.dumps({"method": plan.method, "version": _version(), "options": _options_dict(plan)})}
    atomic_write(directory / WEIGHTS_NAME, _safetensors_bytes(tensors, provenance))
    atomic_write(directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return directory


def peft_factors(state: AdapterState, slot: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [r', K], lora_B [N, r']) with lora_B·lora_A = ΔW of ``slot`` (PEFT scaling 1)."""
    f = state.factors(slot)
    a = f.A if f.u is None else f.u.unsqueeze(1) * f.A
    b = f.B if f.v is None else f.v.unsqueeze(1) * f.B
    b = b * f.scale
    if f.u is not None and state.effective_rank(slot) < f.A.shape[0]:
        keep = torch.nonzero(f.u != 0).flatten()  # pruned components have u = 0: dropping them is exact
        a, b = a.index_select(0, keep), b.index_select(1, keep)
    return a.detach().contiguous(), b.detach().contiguous()


def _peft_config(model: nn.Module, plan: Plan, targets: List[str], pattern: Dict[str, int],
                 modules_to_save: List[str], fan_in_fan_out: bool) -> Dict[str, Any]:
    cls = type(model).__name__
    task_type = next((t for suffix, t in _PEFT_TASK_TYPES if cls.endswith(suffix)), None)
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": name,
        "r": plan.rank, "lora_alpha": plan.rank,  # scaling = lora_alpha / r = 1: the scale is in lora_B
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": targets, "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": fan_in_fan_out, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }


def _options_dict(plan: Plan) -> Dict[str, Any]:
    opts = plan.options
    d = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(opts)
    return json.loads(json.dumps(d, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _version() -> str:
    from . import __version__

    return __version__


__all__ = ["save", "load", "export_peft", "read_config", "trained_outside_adapter", "peft_factors", "atomic_write",
           "fsync_dir", "requested_rank", "CONFIG_NAME", "WEIGHTS_NAME"]
