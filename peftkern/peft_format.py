"""The standard PEFT LoRA format, both ways: ``export_peft`` writes any method's adapter as a PEFT
LoRA adapter, ``load_peft`` reads one into a model as peftkern's ``lora`` method.

A PEFT LoRA adapter is ``adapter_config.json`` (a LoraConfig) and ``adapter_model.safetensors``
with ``base_model.model.<module>.lora_A.weight`` [r, K] and ``.lora_B.weight`` [N, r] per
module, and the full weights of ``modules_to_save``. PEFT adds s·B·A to the module, with
s = lora_alpha / r (lora_alpha / √r with use_rslora), per-module r and alpha from
``rank_pattern`` and ``alpha_pattern``.

Export chooses the exact form per adapter: when no module has a u or v factor (lora, PG,
tied factors without u/v), A and B are written as they are with the real alpha, rsLoRA
flag, dropout and rank/alpha patterns, so that ``load_peft`` then ``export_peft`` gives the
same adapter back. Otherwise (VeRA, Tied-LoRA with u/v, AdaLoRA) each module is folded:
lora_A = u⊙A, lora_B = s·(v⊙B), alpha = r (PEFT's scale 1), dropping AdaLoRA's pruned
components (per-module ranks in ``rank_pattern``). Either way PEFT computes the same ΔW.

``load_peft`` refuses, naming them, config fields it does not know and features it does
not implement (bias training, LoftQ initialisation, layer subsets, ...): a setting is never
silently ignored (cf. huggingface/peft#3582). DoRA (``use_dora``, the ``lora_magnitude_vector``
of each module) is read and written both ways.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from . import patching, quant
from . import snapshot as snapshots
from . import targets as targets_mod
from .factors import AdapterState, Plan
from .files import atomic_write, json_default, read_json_object, remove_stale, safetensors_bytes
from .heads import tied_partners, trained_modules
from .version import __version__

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PathLike = Union[str, os.PathLike]

# LoraConfig fields load_peft honours, and those that carry no meaning for the weights.
SUPPORTED = {"r", "lora_alpha", "target_modules", "lora_dropout", "fan_in_fan_out", "use_rslora", "modules_to_save",
             "rank_pattern", "alpha_pattern", "use_dora",
             # which modules PEFT adapted, as target_modules: the tensors name them (load_peft adapts those)
             "exclude_modules", "layers_to_transform", "layers_pattern"}
METADATA = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "init_lora_weights",  # how PEFT initialises (those leaving W0 as it is: below)
            "megatron_core", "qalora_group_size",  # read only together with megatron_config / use_qalora
            "runtime_config", "ensure_weight_tying"}
# PEFT's inits that rewrite W0 at init (PiSSA, CorDA, OLoRA: W0 − B·A; LoftQ: a quantized W0; LoRA-GA: an
# offset), which PEFT redoes at load: the saved A and B are right only on that base. The others leave W0.
REWRITES_BASE = ("pissa", "corda", "olora", "loftq", "lora_ga")
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# Fields of features peftkern does not implement: accepted only at their neutral value (PEFT 0.21's default).
NEUTRAL: Dict[str, Any] = {
    "bias": "none", "lora_bias": False, "megatron_config": None, "trainable_token_indices": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "lora_ga_config": None, "velora_config": None,
    "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None, "layer_replication": None,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}


# --- export ---------------------------------------------------------------------------------------


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's: whose base weight its "auto" saving writes


# peftkern's own files (native_format.py's names; imported from there would be a cycle)
NATIVE_NAMES = ("peftkern_model.safetensors", "peftkern_config.json")


def export_peft(model: nn.Module, directory: PathLike, skip_empty: bool = False,
                snapshot: Optional[Any] = None, save_embedding_layers: bool = True) -> Optional[Path]:
    """Write the adapter of a patched ``model`` as a standard PEFT LoRA adapter with the same ΔW.
    peftkern's own files of an earlier ``save`` in ``directory`` are removed (they would be an older
    adapter beside it), with a log line; ``peftkern.save`` writes both formats together.

    Tensors are written in the adapter's dtype (module docstring for the two forms).
    Modules trained outside the adapter (a classification head) go to ``modules_to_save``, both
    halves of a tied pair (an LM head tied to the input embeddings) included. Raises ValueError
    for a merged model (unmerge first), and when every module has effective rank 0 (nothing to
    export; with ``skip_empty`` it then writes nothing and returns None). peft itself is not
    needed to write this. A model sharded with FSDP2 is gathered first (every rank must call;
    ``peftkern.save`` says which rank writes); ``snapshot`` is the writers' own (internal).
    ``save_embedding_layers`` (PEFT's name): an adapted ``embed_tokens`` or ``lm_head`` is written
    with its own base weight (vocab × hidden values), as PEFT's default "auto" writes it for such
    targets, unless False.
    """
    out = write_peft(model, directory, skip_empty, snapshot, save_embedding_layers)
    if out is not None:
        remove_stale(out, NATIVE_NAMES, "PEFT adapter")
    return out


def write_peft(model: nn.Module, directory: PathLike, skip_empty: bool = False,
               snapshot: Optional[Any] = None, save_embedding_layers: bool = True) -> Optional[Path]:
    """``export_peft`` without touching other files (``peftkern.save`` writes its own beside it)."""
    snapshot = snapshot or snapshots.take(model)
    state = snapshot.state
    merged = [p for p, m in patching.adapted_modules(model) if m.merged]
    if merged:
        raise ValueError(f"cannot export a merged model (merged: {merged[:3]}); call peftkern.unmerge(model) first, "
                         "so that the exported adapter applies to the original base weights")
    plan = state.plan
    modules = dict(model.named_modules())
    with torch.no_grad():
        factors = {s.path: state.factors(s.index) for s in plan.slots}
        raw = all(f.u is None and f.v is None for f in factors.values())
        pairs = {s.path: (_raw_factors(factors[s.path]) if raw else peft_factors(state, s.index)) for s in plan.slots}
    pairs = {path: ab for path, ab in pairs.items() if ab[0].shape[0] > 0}  # rank 0: ΔW = 0, nothing to add
    if not pairs:
        if skip_empty:
            return None
        raise ValueError("nothing to export: every adapted module has effective rank 0 (ΔW = 0)")
    tensors: Dict[str, torch.Tensor] = {}
    for path, (lora_a, lora_b) in pairs.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_b
    if plan.use_dora:  # PEFT's DoRA: the magnitude of each module as its lora_magnitude_vector
        for s in plan.slots:
            if s.path in pairs:
                # ".weight" is the parameter's own name; PEFT writes the key without it and reads both, while
                # transformers' load_adapter (5.25) maps only this one (PEFT's own DoRA files load there with
                # m left at its random init: logits off by 0.38 on a tiny Llama)
                tensors[f"{PEFT_PREFIX}{s.path}.lora_magnitude_vector.weight"] = state.dora.m[s.index].detach()
    heads = trained_modules(model)
    for module_path in heads:
        for pname, t in snapshot.module_tensors(model, module_path).items():
            tensors[f"{PEFT_PREFIX}{module_path}.{pname}"] = t
    for path in pairs if save_embedding_layers else ():  # PEFT's "auto": an adapted embedding or LM head's own
        # weight, which a resized vocabulary changes (load_peft restores it: the file then exports back equal)
        base = modules[path].base_layer
        if path.rpartition(".")[2] in EMBEDDING_LAYER_NAMES and quant.kind(base) is None:
            tensors[f"{PEFT_PREFIX}{path}.base_layer.weight"] = snapshot.module_tensors(model, path + ".base_layer")["weight"]
    ranks = {path: ab[0].shape[0] for path, ab in pairs.items()}
    if raw:
        alphas = {s.path: plan.slot_alpha(s) for s in plan.slots if s.path in ranks}
        alpha, rslora = plan.alpha, plan.use_rslora
    else:  # folded: the scale is in lora_B, PEFT's own scale must be 1
        alphas, alpha, rslora = {p: float(r) for p, r in ranks.items()}, float(plan.rank), False
    transposed = any(targets_mod.is_transposed(modules[p].base_layer) for p in ranks)
    config = _config(model, plan, ranks, alphas, alpha, rslora, _whole_modules(model, heads), transposed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Provenance goes in the safetensors header, which PEFT ignores; in adapter_config.json
    # an unknown key makes peft warn on every load.
    provenance = {"peftkern": json.dumps({"method": plan.method, "version": __version__,
                                          "form": "raw" if raw else "folded"}, default=json_default)}
    atomic_write(directory / PEFT_WEIGHTS_NAME, safetensors_bytes(tensors, provenance))
    atomic_write(directory / PEFT_CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return directory


def _raw_factors(f) -> Tuple[torch.Tensor, torch.Tensor]:
    return f.A.detach().contiguous(), f.B.detach().contiguous()


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


def _whole_modules(model: nn.Module, paths: List[str]) -> List[str]:
    """PEFT's ``modules_to_save`` names whole modules: each path widened to its largest ancestor (never the model)
    whose every parameter is among those of ``paths``, e.g. RoBERTa's ``classifier`` (a head module holding
    ``dense`` and ``out_proj``), which PEFT saves under that name and fails to load under its parts' (a
    KeyError in its ``set_peft_model_state_dict``). The tensors' keys are the same either way."""
    trained = {id(p) for path in paths for p in model.get_submodule(path).parameters()}
    out: List[str] = []
    for path in paths:
        parts, widest = path.split("."), path
        for i in range(len(parts) - 1, 0, -1):
            params = list(model.get_submodule(".".join(parts[:i])).parameters())
            if not params or not all(id(p) in trained for p in params):
                break
            widest = ".".join(parts[:i])
        if widest not in out:
            out.append(widest)
    return out


def _target_names(model: nn.Module, paths: Iterable[str]) -> List[str]:
    """``target_modules`` as PEFT users write it (["q_proj", "v_proj"]) where those names match exactly the
    adapted modules in this model (PEFT matches a plain name against the end of each module's path), else
    the modules' full paths, which match only themselves."""
    paths = set(paths)
    leaves = {p.rpartition(".")[2] for p in paths}
    named = {name for name, _ in model.named_modules() if name and name.rpartition(".")[2] in leaves}
    return sorted(leaves if named == paths else paths)


def _config(model: nn.Module, plan: Plan, ranks: Dict[str, int], alphas: Dict[str, float], alpha: float,
            rslora: bool, modules_to_save: List[str], fan_in_fan_out: bool) -> Dict[str, Any]:
    r = plan.rank
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": targets_mod.peft_task_type(model), "base_model_name_or_path": name,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "target_modules": _target_names(model, ranks), "modules_to_save": modules_to_save or None,
        "fan_in_fan_out": fan_in_fan_out, "lora_dropout": plan.dropout, "bias": "none",
        "use_dora": plan.use_dora, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }


# --- import ---------------------------------------------------------------------------------------


def read_peft_config(directory: Path) -> Dict[str, Any]:
    """Parse a PEFT LoRA ``adapter_config.json``; ValueError names every field that is unknown or set
    to a feature peftkern does not implement."""
    path = directory / PEFT_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: not a PEFT adapter directory")
    config = read_json_object(path)
    if config.get("format") == "peftkern":
        raise ValueError(f"{str(path)!r} is a peftkern adapter: load it with peftkern.load(model, directory)")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{str(path)!r} is a {config.get('peft_type')!r} adapter; load_peft reads LoRA adapters "
                         "(peft_type 'LORA')")
    unknown = sorted(set(config) - SUPPORTED - METADATA - set(NEUTRAL))
    if unknown:
        raise ValueError(f"{str(path)!r} has field(s) this version does not know: {', '.join(unknown)}; "
                         "refusing to guess what they change")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(REWRITES_BASE):
        raise ValueError(f"{str(path)!r} was initialised with init_lora_weights={init!r}, which rewrites the base "
                         "weights (W0 minus the initial B·A, or a quantized W0): its A and B are only right on that "
                         "rewritten base, which PEFT rebuilds at load and peftkern does not. Convert it to a plain "
                         "LoRA adapter first (PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)); "
                         f"load_peft reads adapters whose init_lora_weights is one of: {', '.join(map(repr, PLAIN_INITS))}")
    unsupported = [f"{k}={config[k]!r}" for k, neutral in NEUTRAL.items()
                   if k in config and not _neutral(config[k], neutral)]
    if unsupported:
        raise ValueError(f"{str(path)!r} uses LoRA features peftkern does not implement: {', '.join(unsupported)} "
                         "(it loads plain LoRA: A, B, alpha, rsLoRA, dropout, rank/alpha patterns, modules_to_save)")
    return config


def _neutral(value: Any, neutral: Any) -> bool:
    empty = (None, {}, [], "")
    return value == neutral or (neutral in empty and value in empty)


def _alpha_for(path: str, pattern: Dict[str, Any], default: Any) -> Any:  # ranks too
    """PEFT's lookup: the first key such that the module path ends with it (as a regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_peft(model: nn.Module, directory: PathLike, backend: str = "auto", *,
              autocast_adapter_dtype: bool = True) -> nn.Module:
    """Patch ``model`` with the PEFT LoRA adapter in ``directory`` (as peftkern's ``lora``) and return it.

    ``autocast_adapter_dtype`` as ``patch``'s (and PEFT's ``from_pretrained``'s): on a bf16/fp16 model
    the factors are fp32 unless it is False.

    The adapter's A and B are trainable, so it can be trained further, run on peftkern's
    kernels, merged, saved or exported again (``export_peft`` writes back an equal adapter).
    Per-module ranks and alphas (``rank_pattern``, ``alpha_pattern``), rsLoRA, dropout and
    ``modules_to_save`` are honoured; ``fan_in_fan_out`` is checked against the modules
    (GPT-2's Conv1D is fan-in-fan-out by construction). Raises (FileNotFoundError,
    ValueError) before the model is modified for a missing or corrupt file, an unknown or
    unsupported config field, a module the model does not have, or a shape that differs.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_peft_config(directory)
    weights = directory / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} is missing: the adapter has a config but no tensors")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors has its own error types for each kind of damage
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file: {exc}") from exc
    pairs, heads, bases = _split(tensors)
    dora = bool(config.get("use_dora", False))
    has_m = [("m" in ab) for ab in pairs.values()]
    if (dora and not all(has_m)) or (not dora and any(has_m)):
        raise ValueError(f"{str(directory)!r}: use_dora is {dora} in adapter_config.json but "
                         f"{'not every' if dora else 'some'} module has a lora_magnitude_vector")
    modules = dict(model.named_modules())
    missing = [p for p in pairs if p not in modules]
    if missing:
        raise ValueError(f"the adapter adapts module(s) this model does not have: {missing[:4]}")
    _check_fan_in_fan_out(config, [modules[p] for p in pairs])
    left_out = [p for p in pairs if _left_out(config, p)]
    if left_out:
        raise ValueError(f"{str(directory)!r}: the tensors adapt {left_out[:3]}, which adapter_config.json's "
                         f"exclude_modules / layers_to_transform leave out (PEFT would not load them): the file and "
                         "its config do not belong together")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    ranks = {p: ab["A"].shape[0] for p, ab in pairs.items()}
    wrong = {p: (k, _alpha_for(p, config.get("rank_pattern") or {}, r)) for p, k in ranks.items()
             if k != _alpha_for(p, config.get("rank_pattern") or {}, r)}
    if wrong:  # PEFT builds the config's rank and refuses the tensors; the scale α/r would be another
        path, (k, want) = next(iter(wrong.items()))
        raise ValueError(f"{str(directory)!r}: lora_A of {path} has rank {k} but adapter_config.json gives it rank "
                         f"{want} (r, or its rank_pattern entry), and {len(wrong) - 1} more module(s) disagree: "
                         "the file and its config do not belong together")
    alphas = {p: _alpha_for(p, config.get("alpha_pattern") or {}, alpha) for p in pairs}
    p = patching.plan(model, "lora", r, sorted(pairs, key=list(modules).index), alpha, backend,
                      dropout=config.get("lora_dropout", 0.0), use_rslora=bool(config.get("use_rslora", False)),
                      rank_pattern={re.escape(k): v for k, v in ranks.items() if v != r},
                      alpha_pattern={re.escape(k): v for k, v in alphas.items() if v != alpha},
                      modules_to_save=list(heads) or None, use_dora=dora, rank_limit=False,
                      autocast_adapter_dtype=autocast_adapter_dtype)
    state = patching.build(p)
    head_values = _check_heads(model, heads) + _check_bases(modules, bases, pairs)
    with torch.no_grad():
        for slot in p.slots:
            f = state.factors(slot.index)
            for name, dst in (("A", f.A), ("B", f.B)):
                src = pairs[slot.path][name]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"lora_{name} of {slot.path} has shape {tuple(src.shape)}; this model's module "
                                     f"needs {tuple(dst.shape)}")
            if dora and tuple(pairs[slot.path]["m"].shape) != (slot.out_features,):
                raise ValueError(f"lora_magnitude_vector of {slot.path} has shape "
                                 f"{tuple(pairs[slot.path]['m'].shape)}; this model's module needs ({slot.out_features},)")
        for slot in p.slots:  # checked: now copy
            f = state.factors(slot.index)
            f.A.copy_(pairs[slot.path]["A"].to(f.A))
            f.B.copy_(pairs[slot.path]["B"].to(f.B))
            if dora:
                state.dora.m[slot.index].copy_(pairs[slot.path]["m"].to(state.dora.m[slot.index]))
    patching.commit(model, state, fresh=False)
    with torch.no_grad():
        for param, value in head_values:
            param.copy_(value.to(param))
    return model


def _left_out(config: Dict[str, Any], key: str) -> bool:
    """Whether PEFT 0.21's ``exclude_modules`` / ``layers_to_transform`` (with ``layers_pattern``) leave the
    module ``key`` out (its ``check_target_module_exists``)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, key):
            return True
        if not isinstance(exclude, str) and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
            return True
    layers, targets = config.get("layers_to_transform"), config.get("target_modules")
    # a regex target_modules, or a module named by its full path in the list, takes no layer filter
    if layers is None or layers == [] or isinstance(targets, str) or key in (targets or ()):
        return False
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:  # the first numbered segment is the layer's index
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for name in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return True
    index = int(match.group("idx"))
    return index != layers if isinstance(layers, int) else index not in layers


def _split(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, Dict],
                                                      Dict[str, Dict[str, torch.Tensor]]]:
    """{module path: {"A", "B"}}, {head module path: {param name: tensor}} and {adapted module path:
    {param name: tensor}} (its base layer's own weights) from PEFT's keys."""
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    heads: Dict[str, Dict[str, torch.Tensor]] = {}
    bases: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"tensor {key!r} is not under {PEFT_PREFIX!r}: not a PEFT adapter file")
        name = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        # an adapted embedding or LM head's own weight: PEFT's save_embedding_layers ("auto", its default,
        # saves it whenever the targets include embed_tokens or lm_head); loading restores it, as PEFT does
        m = re.fullmatch(r"(.+)\.base_layer\.([^.]+)", name)
        if m:
            bases.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        m = re.fullmatch(r"(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", name)  # DoRA's m, any key form
        if m:
            pairs.setdefault(m.group(1), {})["m"] = t
            continue
        if ".lora_" in name:
            raise ValueError(f"tensor {key!r} is a LoRA tensor peftkern does not read (lora_A, lora_B and DoRA's "
                             "lora_magnitude_vector only)")
        module, _, param = name.replace(".modules_to_save", "").rpartition(".")
        heads.setdefault(module, {})[param] = t
    incomplete = [p for p, ab in pairs.items() if not {"A", "B"} <= set(ab)]
    if incomplete:
        raise ValueError(f"module(s) {incomplete[:4]} have lora_A or lora_B but not both")
    if not pairs:
        raise ValueError("the adapter file holds no lora_A / lora_B weights")
    return pairs, heads, bases


def _check_fan_in_fan_out(config: Dict[str, Any], modules: List[nn.Module]) -> None:
    stated = bool(config.get("fan_in_fan_out", False))
    actual = {targets_mod.is_transposed(m) for m in modules}
    if actual != {stated}:
        warnings.warn(f"adapter_config.json says fan_in_fan_out={stated}, but the adapted modules store their "
                      f"weights {'as [in, out] (Conv1D)' if True in actual else 'as [out, in] (Linear)'}; the "
                      "factors are read in PEFT's layout either way (as PEFT itself corrects this)", UserWarning,
                      stacklevel=3)


def _check_heads(model: nn.Module, heads: Dict[str, Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for module_path, params in heads.items():
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"the adapter saves module {module_path!r} (modules_to_save), which this model does "
                             "not have") from None
        out += _matched(module, module_path, params)
    partners = tied_partners(model, list(heads)) if heads else []
    if partners:  # PEFT's default (ensure_weight_tying=False) trains a tied module's copy, its partner left as it was
        named = ", ".join(heads)
        raise ValueError(
            f"the adapter saves {named} (modules_to_save) but not {', '.join(partners)}, which shares its weight in this "
            f"model (tied embeddings): PEFT trained {named} apart from it (modules_to_save with ensure_weight_tying="
            "False, PEFT's default), and peftkern trains a tied pair together. To load it as PEFT does, untie the pair "
            "first: `model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())` and "
            "`model.config.tie_word_embeddings = False`; or save the adapter from PEFT with ensure_weight_tying=True")
    return out


def _check_bases(modules: Dict[str, nn.Module], bases: Dict[str, Dict[str, torch.Tensor]],
                 pairs: Dict[str, Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(the model's base parameter, the saved value) for each base weight saved beside an adapted module."""
    out = []
    for path, params in bases.items():
        if path not in pairs:
            raise ValueError(f"the adapter saves {path}.base_layer's weights but adapts no module {path!r}")
        if quant.kind(modules[path]) is not None:
            raise ValueError(f"the adapter saves {path}'s base weights, which this model holds quantized: load it onto "
                             "a full-precision model, or save it from PEFT with save_embedding_layers=False")
        out += _matched(modules[path], f"{path}.base_layer", params)
    return out


def _matched(module: nn.Module, label: str, params: Dict[str, torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(the module's parameter, the saved value) per saved name; ValueError naming ``label.name`` for a
    parameter the module lacks or of another shape."""
    own = dict(module.named_parameters())
    out = []
    for name, t in params.items():
        if name not in own or tuple(own[name].shape) != tuple(t.shape):
            have = tuple(own[name].shape) if name in own else "no such parameter"
            raise ValueError(f"{label}.{name} is {tuple(t.shape)} in the adapter, {have} in this model")
        out.append((own[name], t))
    return out


__all__ = ["export_peft", "load_peft", "peft_factors", "read_peft_config",
           "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME"]
