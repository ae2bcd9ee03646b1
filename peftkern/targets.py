"""Which modules to adapt: default targets per architecture, Linear/Conv1D discovery, layer indices."""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from . import quant
from .factors import Slot

try:  # GPT-2 style layers store their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except Exception:  # transformers is optional for plain nn.Module use
    Conv1D = None  # type: ignore[assignment]

# model_type -> default targets. Attention query and value, as LoRA, the LEFT paper and
# PEFT do. DeBERTa-v2 names them query_proj/value_proj and DeBERTa (v1) fuses them into
# in_proj, so the table uses the names those models actually have.
DEFAULT_TARGETS: Dict[str, Tuple[str, ...]] = {
    **{t: ("q_proj", "v_proj") for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "starcoder2", "phi", "opt", "gptj", "granite", "stablelm", "smollm3")},
    **{t: ("query_key_value",) for t in ("gpt_neox", "bloom", "falcon")},
    "phi3": ("qkv_proj",),  # Phi-3, Phi-3.5, Phi-4-mini: q, k, v fused in one Linear, as GPT-NeoX's (PEFT has none)
    **{t: ("query", "value") for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie")},
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "t5": ("q", "v"),
    "mpnet": ("q", "v"),
}

TargetSpec = Union[None, str, Sequence[str]]


def _all_linear(model: nn.Module) -> List[str]:
    """PEFT's "all-linear": every Linear/Conv1D in the model's repeated blocks (so never the output
    head, the embeddings' projection or a classifier, which sit outside them). Raises ValueError for an
    encoder-decoder model, whose two stacks of blocks one index cannot cover (``layer_index_map``)."""
    if is_encoder_decoder(model):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = sorted({p.rpartition(".")[2] for p, m in model.named_modules() if p and is_adaptable(m) and m is not head})
        raise ValueError(f"targets='all-linear' covers one stack of repeated blocks, and {type(model).__name__} is an "
                         "encoder-decoder model with two (the encoder's and the decoder's): name the targets in a list "
                         f"to adapt both (its Linear layers: {', '.join(names[:12])})")
    inside = layer_index_map(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [path for path, m in model.named_modules() if path in inside and is_adaptable(m) and m is not head]


# Named target sets (strings that are not regexes): name -> model -> the module paths to adapt.
TARGET_SETS = {"all-linear": _all_linear}


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """Conv1D keeps its weight as [in, out]; nn.Linear as [out, in]."""
    return Conv1D is not None and isinstance(module, Conv1D)


def features(module: nn.Module) -> Tuple[int, int]:
    """(in, out) features. A quantized Linear's packed weight says nothing about them: its attributes do."""
    if quant.kind(module) is not None:
        return quant.features(module)
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_transposed(module) else (w.shape[1], w.shape[0])


# transformers models whose own code edits a Linear's output in place: model type -> (module name, whether the
# model's config takes that code path, what the edit is). DoRA keeps a module's output for its backward (dm is
# read back from it), so an in-place edit of it breaks that backward; ``edited_in_place`` names them first.
INPLACE_OUTPUTS: Dict[str, Tuple[str, Callable[[object], bool], str]] = {
    "falcon": ("dense_4h_to_h", lambda cfg: bool(getattr(cfg, "new_decoder_architecture", False)
                                                 or getattr(cfg, "parallel_attn", False)),
               "mlp_output += attention_output"),
}


def edited_in_place(model: nn.Module, paths: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(a path among ``paths`` whose output this model's own code edits in place, the edit), or None."""
    entry = INPLACE_OUTPUTS.get(model_type(model))
    if entry is None or not entry[1](getattr(model, "config", None)):
        return None
    hit = next((p for p in paths if p.rpartition(".")[2] == entry[0]), None)
    return None if hit is None else (hit, entry[2])


def model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", "") or ""


def default_targets(model: nn.Module) -> Tuple[str, ...]:
    mtype = model_type(model)
    if mtype in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[mtype]
    names = sorted(adaptable_names(model))
    raise ValueError(
        f"no default targets for model type {mtype or type(model).__name__!r}; pass targets=[...]. "
        f"Linear/Conv1D modules in this model: {', '.join(names) or '(none)'}"
    )


def adaptable_names(model: nn.Module) -> List[str]:
    """Distinct last path components of every Linear/Conv1D, for error messages."""
    return sorted({path.rsplit(".", 1)[-1] for path, m in model.named_modules() if path and is_adaptable(m)})


def compile_pattern(name: str, pattern: str) -> "re.Pattern":
    """``re.compile(pattern)``, or ValueError naming the argument and the regex's fault."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{name}={pattern!r} is not a valid regular expression ({exc}); a string is one regex "
                         f"matched against each module's full path, e.g. r'.*\\.q_proj'; to name modules pass a "
                         f"list, e.g. ['q_proj', 'v_proj']") from None


def _matcher(targets: TargetSpec):
    if isinstance(targets, str):  # a single string is a regex over full module paths (PEFT's convention),
        # unless it names a target set (TARGET_SETS)
        pattern = compile_pattern("targets", targets)
        return [targets], lambda path, t: pattern.fullmatch(path) is not None
    return list(targets), lambda path, t: path == t or path.endswith("." + t)


def is_encoder_decoder(model: nn.Module) -> bool:
    """An encoder-decoder transformers model (T5, BART, Whisper): two stacks of repeated blocks."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def layer_index_map(model: nn.Module) -> Dict[str, int]:
    """module path -> index of the repeated block containing it.

    The blocks are the largest nn.ModuleList of the model (Llama's ``model.layers``,
    BERT's ``encoder.layer``, GPT-2's ``h``). Found from the module tree, not from names.
    Empty for an encoder-decoder model: its encoder's and decoder's blocks are two stacks, which
    one index would mix up (T5's blocks even hold ModuleLists longer than the stack itself); what
    needs the index (PG, joint QKV, all-linear) refuses it and says so.
    """
    if is_encoder_decoder(model):
        return {}
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best[1])):
            best = (path, m)
    if best is None:
        return {}
    prefix, blocks = best
    out: Dict[str, int] = {}
    for i, block in enumerate(blocks):
        base = f"{prefix}.{i}" if prefix else str(i)
        for sub, _ in block.named_modules():
            out[f"{base}.{sub}" if sub else base] = i
    return out


def find_targets(model: nn.Module, targets: TargetSpec) -> List[Slot]:
    """Every Linear/Conv1D matching ``targets``, as Slots in model order.

    Raises ValueError if a target matches nothing, listing the module names that exist.
    """
    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, str) and targets in TARGET_SETS:
        paths = TARGET_SETS[targets](model)
        if not paths:
            raise ValueError(f"targets={targets!r} found no Linear/Conv1D module in this model's repeated blocks")
        return find_targets(model, paths)
    if not isinstance(targets, str):
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets) or not targets:
            raise TypeError(f"targets must be a non-empty list of module names or a regex string, got {targets!r}")
    wanted, match = _matcher(targets)
    layer_of = layer_index_map(model)
    slots: List[Slot] = []
    hits = {t: 0 for t in wanted}
    for path, module in model.named_modules():
        if not path or not is_adaptable(module):
            continue
        for t in wanted:
            if match(path, t):
                hits[t] += 1
                k, n = features(module)
                name = path.rsplit(".", 1)[-1]
                quantized = quant.check(module, path) if quant.kind(module) is not None else None
                slots.append(Slot(len(slots), path, name, layer_of.get(path), k, n, quantized))
                break
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        names = adaptable_names(model)
        hint = ""
        if isinstance(targets, str):  # a string is one regex over the full path (PEFT's rule), not a name
            listed = [t.strip() for t in targets.split(",")]
            example = listed[0] if listed[0].isidentifier() else (names[0] if names else "q_proj")
            hint = (f"; a string is one regex matched against each module's full path (re.fullmatch, as PEFT's "
                    f"target_modules), e.g. r'.*\\.{example}'; to name modules pass a list: targets={listed!r}; "
                    f"named sets: {', '.join(map(repr, sorted(TARGET_SETS)))}")
        raise ValueError(
            f"target(s) {missing} matched no nn.Linear or Conv1D module. "
            f"Linear/Conv1D module names in this model: {', '.join(names) or '(none)'}{hint}"
        )
    return slots


# transformers' auto mapping -> PEFT task_type (a model in none of them loads as a plain PeftModel)
_PEFT_TASKS = (("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
               ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
               ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
               ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"))
_HEAD_TABLES = ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES")


def _classes(table: str) -> frozenset:
    """Class names in one of transformers' auto mappings (empty without transformers)."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except Exception:  # transformers is optional for plain nn.Module use
        return frozenset()
    names = set()
    for value in getattr(auto, table, {}).values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(names)


def peft_task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task_type for ``model`` (SEQ_CLS, CAUSAL_LM, ...), from transformers' own auto mappings."""
    name = type(model).__name__
    return next((task for table, task in _PEFT_TASKS if name in _classes(table)), None)


def _task_head_classes() -> frozenset:
    """Class names of transformers' models whose task head is freshly initialised for fine-tuning
    (sequence and token classification, question answering, multiple choice)."""
    return frozenset().union(*(_classes(t) for t in _HEAD_TABLES))


def modules_to_save(model: nn.Module, requested: Optional[Sequence[str]]) -> List[str]:
    """The modules trained in full next to the adapter (PEFT's ``modules_to_save``), as module paths.

    ``requested`` names modules (suffix match, as targets); None means the task head of a
    transformers task model whose head the checkpoint does not provide (a classification
    model: its top-level modules with parameters outside ``model.base_model``), and nothing
    for any other model. Raises ValueError for a name that matches no module."""
    if requested is None:
        base = getattr(model, "base_model", None)
        if type(model).__name__ not in _task_head_classes() or base is None or base is model:
            return []
        return [name for name, child in model.named_children()
                if child is not base and any(True for _ in child.parameters())]
    if isinstance(requested, str) or not all(isinstance(n, str) for n in requested):
        raise TypeError(f"modules_to_save must be a list of module names, got {requested!r}")
    out = []
    for name in requested:
        hits = [p for p, _ in model.named_modules() if p and (p == name or p.endswith("." + name))]
        if not hits:
            raise ValueError(f"modules_to_save entry {name!r} matches no module of this model")
        out += [h for h in hits if h not in out]
    return out
