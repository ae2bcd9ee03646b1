"""Factor sources: where A, B, u and v come from.

Every method is the same adapter, y = W0·x + s·(v ⊙ (B·(u ⊙ (A·x)))); methods differ only
in where the four factors come from. A method builds one ``AdapterState`` (an nn.Module
registered once on the model as ``model.peftkern``) that owns every tensor of the adapter:
per-module parameters, parameters tied across modules, hypernetworks and their
embeddings, and any optimiser-side state (AdaLoRA's importance scores).

Each patched module holds a slot index into that state and asks it for ``Factors`` on
every forward. The state says *what* the factors are (from the ops it uses only the
reference math, for ΔW); a method whose factors are computed (PG's hypernetworks) calls
the ops layer itself, and the ops know nothing about methods. The state is registered on the
model root as ``model.peftkern`` (``STATE_ATTR``); ``state_of`` and ``is_patched`` find it.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import dist, stamps
from .casts import Casts
from .ops import reference
from .ops.registry import Resolver

log = logging.getLogger("peftkern")

# AdapterState -> [(weak reference to a parameter, its recorded dtype)]: keep_dtypes' quick check
_WATCH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

Tensor = torch.Tensor

STATE_ATTR = "peftkern"  # model.peftkern is the AdapterState
FACTOR_NAMES = ("A", "B", "u", "v")


@dataclass(frozen=True)
class Slot:
    """One module to adapt, as discovered by ``targets.find_targets``."""

    index: int
    path: str  # module path in the model, e.g. "model.layers.3.self_attn.q_proj"
    name: str  # the target name it matched, e.g. "q_proj"
    layer: Optional[int]  # index of the repeated block that contains it, None if outside the blocks
    in_features: int
    out_features: int
    quantized: Optional[str] = None  # "4bit" / "8bit" for a bitsandbytes base layer (quant.py), None if dense


@dataclass
class Plan:
    """Everything a method needs to build its state, known before the model is touched."""

    method: str
    rank: int
    alpha: float
    options: Any  # the method's options dataclass, already validated
    slots: List[Slot]
    device: torch.device
    dtype: torch.dtype
    model_type: str = ""
    backend: str = "auto"  # requested backend (AdapterState.backends resolves it for every op)
    requested_rank: Optional[int] = None  # patch()'s ``rank`` as given (None: the default); plan.rank sizes factors
    dropout: float = 0.0  # PEFT's lora_dropout: probability of zeroing an element of the adapter's input
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)  # slot path -> rank (PEFT's rank_pattern)
    alpha_pattern: Dict[str, float] = dataclasses.field(default_factory=dict)  # slot path -> alpha
    use_rslora: bool = False  # s = alpha / sqrt(r) instead of alpha / r (rsLoRA, Kalajdzievski 2023)
    modules_to_save: List[str] = dataclasses.field(default_factory=list)  # trained outside the adapter (heads)
    use_dora: bool = False  # DoRA: a trained magnitude per module over the normalised W0 + ΔW (peftkern/dora.py)
    # PEFT's autocast_adapter_dtype: an fp32 adapter on a half-precision model (then ``dtype`` is fp32, the
    # adapter's, and ``model_dtype`` the model's)
    autocast_adapter_dtype: bool = True
    model_dtype: Optional[torch.dtype] = None

    @property
    def scale(self) -> float:
        return self.scale_of(self.rank, self.alpha)

    def scale_of(self, rank: int, alpha: float) -> float:
        """s = α/r, or α/√r with rsLoRA."""
        return alpha / (rank ** 0.5 if self.use_rslora else rank)

    def slot_rank(self, slot: "Slot") -> int:
        return self.rank_pattern.get(slot.path, self.rank)

    def slot_alpha(self, slot: "Slot") -> float:
        return self.alpha_pattern.get(slot.path, self.alpha)

    def slot_scale(self, slot: "Slot") -> float:
        return self.scale_of(self.slot_rank(slot), self.slot_alpha(slot))

    @property
    def layers(self) -> List[int]:
        """Sorted distinct block indices that contain targets."""
        return sorted({s.layer for s in self.slots if s.layer is not None})

    @property
    def target_names(self) -> List[str]:
        seen: Dict[str, None] = {}
        for s in self.slots:
            seen.setdefault(s.name, None)
        return list(seen)

    def new_tensor(self, *shape: int) -> Tensor:
        return torch.empty(*shape, device=self.device, dtype=self.dtype)

    def describe(self) -> Dict[str, Any]:
        """JSON-friendly record of the method and its options (adapter_config.json)."""
        opts = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else dict(self.options)
        return {"method": self.method, "rank": self.rank, "alpha": self.alpha, "options": opts,
                "targets": self.target_names, "model_type": self.model_type, "dropout": self.dropout,
                "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
                "use_rslora": self.use_rslora, "modules_to_save": list(self.modules_to_save),
                "use_dora": self.use_dora, "autocast_adapter_dtype": self.autocast_adapter_dtype}


@dataclass
class Factors:
    """What one module multiplies by. ``None`` for u or v means the identity (frozen at 1).

    With ``group`` set (joint-QKV form), A and u belong to the group's shared shrink and
    B and v are this member's slices of the stacked up-projection.
    """

    A: Tensor
    B: Tensor
    u: Optional[Tensor]
    v: Optional[Tensor]
    scale: float
    group: Optional["JointGroup"] = None


class JointGroup:
    """One down-projection shared by every target of a layer (Tied-LoRA's joint QKV).

    Attention modules call q_proj(x), k_proj(x) and v_proj(x) one after another on the
    same tensor. The first call computes hu = (D(x)·Aᵀ)⊙u (``compute``: the layer's shrink
    op); the others find the same ``x`` object and reuse it, so x·Aᵀ runs once per layer. The
    reference is dropped as soon as every member has consumed it, so no activation is
    kept alive. A different ``x`` (cross-attention, say) simply recomputes: always correct.
    So does a change since the first call (``_joint_key``): x, A or u edited in place or replaced, an
    optimizer step, or grad mode switched, where a member called alone left the group open (a
    review's finding: a later call on the same x returned the hu of A before an update).
    """

    __slots__ = ("members", "_x", "_hu", "_left", "_key")

    def __init__(self, members: int):
        self.members = members
        self._x: Optional[Tensor] = None
        self._hu: Optional[Tensor] = None
        self._left = 0
        self._key: Optional[tuple] = None

    def hidden(self, x: Tensor, masters: "Factors", compute: Callable[[], Tensor]) -> Tensor:
        """hu for the layer's input ``x`` and factors ``masters``, both before any cast: the group's, or
        ``compute()``'s (a cast of a trained factor is a new tensor per member)."""
        A, u = masters.A, masters.u
        # (a compiled graph is traced in one pass, where nothing changes between the members' calls)
        compiling = torch.compiler.is_compiling()
        if self._x is x and self._left > 0 and (compiling or _joint_fresh(self._key, x, A, u)):
            hu = self._hu
        else:
            hu = compute()
            self._x, self._hu, self._left = x, hu, self.members
            self._key = None if compiling else _joint_key(x, A, u)
        self._left -= 1
        if self._left == 0:
            self._x = self._hu = self._key = None
        return hu

    def __deepcopy__(self, memo):  # a copy starts with an empty cache
        return JointGroup(self.members)

    def __getstate__(self):
        return {"members": self.members}

    def __setstate__(self, state):
        self.__init__(state["members"])


def _joint_key(x: Tensor, A: Tensor, u: Optional[Tensor]) -> tuple:
    """What a group's hu depends on besides x's identity: x's version (an inference tensor has none),
    the optimizer steps (a fused step bumps no version), grad mode, and the factors' stamp."""
    return (None if x.is_inference() else x._version, stamps.steps(), torch.is_grad_enabled(), stamps.of(A, u))


def _joint_fresh(key: Optional[tuple], x: Tensor, A: Tensor, u: Optional[Tensor]) -> bool:
    """Whether a hu keyed ``key`` (``_joint_key``) still holds for x, A, u."""
    return (key is not None and key[0] == (None if x.is_inference() else x._version) and key[1] == stamps.steps()
            and key[2] == torch.is_grad_enabled() and stamps.matches(key[3], (A, u)))


class AdapterState(nn.Module):
    """Base class of every method's factor source. Subclasses implement ``factors``."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self.disabled = False
        self.reference_pass = False  # a frozen reference's call (reference.py): no regulariser is added
        # the backends of every op this adapter runs, resolved once per device type (and module
        # shape) in the registry, at patch time for the model's device (ops.registry.Resolver)
        self.backends = Resolver(plan.backend)
        self.dora: Optional[nn.Module] = None  # DoRA's magnitudes (dora.Magnitudes) with use_dora=True
        self.casts = Casts()  # the factors in a half compute dtype, where a cast need not run each forward
        # The adapter's dropout rate, read at each training forward (the kernels fuse the dropout itself). An
        # nn.Dropout under PEFT's name, so that what turns a model's dropout off finds it: TRL's DPOTrainer
        # (disable_dropout) sets ``p = 0`` on every nn.Dropout of the model, PEFT's lora_dropout included.
        self.lora_dropout = nn.Dropout(plan.dropout)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("casts", Casts())  # a state pickled before casts were kept
        if "lora_dropout" not in self._modules:  # or before the rate was a module
            self._modules["lora_dropout"] = nn.Dropout(self.plan.dropout)

    def dropout(self) -> float:
        """The dropout rate a training forward applies now: the patch's, unless set to 0 since (``lora_dropout.p``)."""
        return self.lora_dropout.p

    # --- the adapter's dtypes, as patched or moved --------------------------------------
    # TRL's trainers set every trainable parameter of a quantized model to bf16 by assigning ``.data``
    # (QLoRA's advice; PEFT's ``autocast_adapter_dtype`` is not honoured there, peft#2889), which leaves
    # the adapter mixed: trained factors bf16, frozen ones, hypernetwork inputs and AdaLoRA's importance
    # fp32, and ops that need one dtype fail. A move of the whole model or adapter (``.to``, ``.half``)
    # goes through ``_apply`` and is the user's choice; an assignment to ``.data`` is not seen there, so
    # each ``train()`` (the HF Trainer calls it before every step) puts such a parameter back.
    def record_dtypes(self) -> None:
        """Remember every floating parameter's dtype as the adapter's own (at patch, after a move)."""
        self._dtypes = {n: p.dtype for n, p in self.named_parameters() if p.is_floating_point()}
        _WATCH.pop(self, None)

    def keep_dtypes(self) -> None:
        """Put back, with a one-time warning, the dtype of a parameter changed by assignment to ``.data``.
        Never in a distributed run: there a dtype change of ``.data`` replaces the parameter's gradient
        accumulator, which DDP's hooks hold (its gradients would silently stop being averaged), and
        FSDP2's mixed precision gathers parameters in the compute dtype on purpose (both reviews' findings)."""
        expected = self.__dict__.get("_dtypes")
        if not expected or dist.initialized():
            return
        # the usual case, nothing changed, without walking the modules (train() runs once a step): the
        # parameters seen last time, by weak reference, outside __dict__ so that copies and pickles make their own
        watched = _WATCH.get(self)
        if watched is not None and all((p := ref()) is not None and p.dtype == dtype for ref, dtype in watched):
            return
        named = [(n, p) for n, p in self.named_parameters() if n in expected]
        _WATCH[self] = [(weakref.ref(p), expected[n]) for n, p in named]
        changed = [(n, p) for n, p in named if p.dtype != expected[n]]
        if not changed:
            return
        was = sorted({str(p.dtype).replace("torch.", "") for _, p in changed})
        for n, p in changed:
            p.data = p.data.to(expected[n])
        if not self.__dict__.get("_dtypes_said"):
            self._dtypes_said = True
            now = sorted({str(expected[n]).replace("torch.", "") for n, _ in changed})
            log.warning("peftkern: %d of the adapter's weights were set to %s by other than a cast of the whole "
                        "model or adapter (TRL does this to a quantized model's trainable parameters; a cast of "
                        "one part of the adapter does it too); they are back in %s, the dtype the adapter was "
                        "patched with or last cast to as a whole, which its other tensors have. For a "
                        "half-precision adapter, patch a half-precision model with autocast_adapter_dtype=False.",
                        len(changed), " and ".join(was), " and ".join(now))

    def _apply(self, fn, recurse=True):
        before = [p.dtype for p in self.parameters()]
        out = super()._apply(fn, recurse)
        # a cast (model.to(bf16), .half()) sets the adapter's dtypes; a move to a device keeps the record,
        # or the Trainer's move of the model after TRL's cast would make that cast the record
        if "_dtypes" in self.__dict__ and before != [p.dtype for p in self.parameters()]:
            self.record_dtypes()
        return out

    def train(self, mode: bool = True):
        self.keep_dtypes()  # eval() too: an evaluation before the first step (the Trainer's eval_on_start)
        return super().train(mode)

    # --- the hot path -------------------------------------------------------------
    def factors(self, slot: int) -> Factors:
        raise NotImplementedError

    # --- integration points (no-ops unless a method needs them) -----------------------
    def attach(self, model: nn.Module) -> List[Any]:
        """Register hooks on the patched model; return their handles (removed by unpatch)."""
        return []

    def pass_caches(self) -> List[Any]:
        """The objects caching what a forward derives from the adapter's values (DoRA's norms, generated
        factors), each with ``fresh_scope()``: a reference pass over frozen copies of those values keeps
        its own fields of them (reference.py), so that neither evicts nor reads the other's."""
        return [] if self.dora is None else [self.dora]

    def generators(self) -> List[nn.Module]:
        """Modules whose outputs are adapter factors (hypernetworks), watched for NaN/Inf by the
        training monitor. Default: none (the factors are parameters)."""
        return []

    def rank_allocator(self) -> Optional[nn.Module]:
        """The rank allocator (AdaLoRA-style methods), whose state a checkpoint must carry; None for
        methods with fixed ranks."""
        return None

    def before_optimizer_step(self) -> None:
        """Called before every optimizer step over the adapter's parameters, by methods whose
        ``attach`` hooks the optimizer (the rank allocators); default nothing."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step over the adapter's parameters (rank allocation); default nothing."""

    def rank_pattern(self) -> Optional[Dict[str, List[bool]]]:
        """{module path: [kept?] * rank} for methods that prune ranks; None for the others."""
        return None

    def regularization(self) -> Optional[Tensor]:
        """A term to add to the task loss (AdaLoRA's orthogonality), or None."""
        return None

    def describe_slot(self, slot: int) -> Dict[str, str]:
        """Provenance of each factor for explain(), e.g. {"A": "tied, trained", "u": "1"}."""
        return {}

    @torch.no_grad()
    def delta_weight(self, slot: int) -> Tensor:
        """ΔW = s·Λv·B·Λu·A for one slot, in Linear layout [N, K] (Tied-LoRA eq. (1) without x)."""
        f = self.factors(slot)
        return reference.delta_weight(f.A, f.B, f.u, f.v, f.scale)

    def effective_rank(self, slot: int) -> int:
        return self.plan.slot_rank(self.plan.slots[slot])

    def extra_config(self) -> Dict[str, Any]:
        """Method-specific facts to store next to the options (e.g. AdaLoRA's rank pattern)."""
        return {}

    # --- persistence contract used by native_format (save/load) --------------------------
    def tensors_for_save(self) -> Dict[str, Tensor]:
        """Tensors to write to adapter_model.safetensors. Default: the state_dict.

        A method may shrink them here (AdaLoRA drops pruned rank components); it must
        then undo that in ``load_saved``.
        """
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_saved(self, tensors: Dict[str, Tensor], extra: Dict[str, Any]) -> None:
        """Inverse of ``tensors_for_save`` + ``extra_config``. Must raise ValueError naming the
        first mismatching tensor before modifying anything."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter file does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"adapter tensor {k!r} has shape {tuple(t.shape)} but this model needs "
                                 f"{tuple(own[k].shape)}")
        self.load_state_dict(tensors, strict=True)


def register_optional(module: nn.Module, name: str, tensor: Optional[Tensor], trained: bool) -> None:
    """Register ``tensor`` as a Parameter (requires_grad = trained) or None."""
    module.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=trained))


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), AdapterState)


def state_of(model: nn.Module) -> AdapterState:
    """The adapter state of a patched model; ValueError if ``model`` is not patched."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, AdapterState):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and isinstance(getattr(inner, STATE_ATTR, None), AdapterState):
            raise ValueError(f"this is a {type(model).__name__} wrapper around a patched model: pass the model "
                             f"inside it (its .module)")
        raise ValueError("this model is not patched by peftkern; call peftkern.patch(model, ...) first")
    return state


__all__ = ["Slot", "Plan", "Factors", "JointGroup", "AdapterState", "register_optional", "STATE_ATTR",
           "FACTOR_NAMES", "is_patched", "state_of"]
