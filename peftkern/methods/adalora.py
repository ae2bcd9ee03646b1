"""adalora: AdaLoRA (Zhang et al. 2023) as PEFT 0.21 implements it, with allocation that runs by itself.

In the general adapter y = W0·x + s·(v ⊙ (B·(u ⊙ (A·x)))) AdaLoRA's SVD triple is
P = B [N, r], Λ = u [r], Q = A [r, K] and v = 1, with r = init_r. PEFT's names:
lora_B = P, lora_E = Λ (as [r, 1]), lora_A = Q.

* Scale: s = lora_alpha / (ranknum + 1e-5) with ranknum = init_r, as PEFT computes it. We
  keep PEFT's epsilon (a 1e-6 relative difference): it costs nothing, makes the forward,
  the merged ΔW and an exported adapter agree with PEFT to rounding, and s stays a constant.
* Init as PEFT: Λ = 0, P and Q ~ N(0, 0.02). Default lora_alpha = 8 (PEFT's LoraConfig).
* Λ of all slots is one [slots, init_r] Parameter (each slot reads its row), so masking is
  one ``masked_fill_``; P and Q stay per slot, with PEFT's shapes, so that the importance
  means reduce exactly as PEFT's do.
* Allocation (``peftkern.allocator.ImportanceAllocator``) runs from a global optimizer-step
  post hook after every step of an optimizer that holds these parameters; under
  transformers.Trainer add ``peftkern.AllocatorCallback()`` to keep the step in sync.
* The orthogonality regulariser is added to ``outputs.loss`` by a root forward hook when the
  output carries a loss (PEFT's ``AdaLoraModel.forward``); custom loops that compute the
  loss themselves add ``peftkern.orthogonal_regularization(model)``. ``orth_form="peft"``
  (default) is PEFT's mean over the P and Q matrices of ‖G − I‖_F; ``"squared"`` is the
  issue's γ(‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F) averaged over slots.
* Saving drops pruned components physically: each slot's saved P, Λ, Q keep only its kept
  components (variable rank per slot), and ``extra_config`` carries the rank pattern;
  ``merge`` folds only the kept components. As in PEFT, masking zeroes Λ in place on
  masking steps only, so between them (deltaT > 1) a masked Λ entry may regrow and the
  forward uses it while save and merge drop it; from the final mask on they agree exactly.
* Host syncs: none on the step path (the threshold is a device scalar, the pattern a device
  bool tensor [slots, init_r]); ``rank_pattern()``, ``effective_rank``, save and explain read it.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import allocator as alloc
from ..factors import AdapterState, Factors, Plan
from ..ops import importance
from .registry import DEFAULT_RANK, Method, register

Tensor = torch.Tensor

PEFT_RANKNUM_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5); see the module docstring
INIT_STD = 0.02


# --- validation shared with hyper_adalora ----------------------------------------------------------


def resolve_ranks(rank: Optional[int], target_r: Optional[int], init_r: Optional[int]) -> Tuple[int, int]:
    """The public ``rank`` is the target average rank. target_r defaults to it (8 when neither
    is given) and init_r to round(1.5·target_r) (12 for 8, PEFT's defaults). ``rank`` is None
    when the caller did not pass one, so an explicit rank that disagrees with target_r is an error."""
    if target_r is not None:
        target_r = alloc.check_int("target_r", target_r, 1)
        if rank is not None and target_r != rank:
            raise ValueError(f"rank={rank} and target_r={target_r} disagree: for AdaLoRA-style methods rank is the "
                             f"target average rank, so pass rank={target_r} (and init_r to size the factors)")
    target = target_r if target_r is not None else (DEFAULT_RANK if rank is None else rank)
    init = max(round(1.5 * target), target) if init_r is None else alloc.check_int("init_r", init_r, 1)
    if target > init:
        raise ValueError(f"target_r ({target}) must not exceed init_r ({init}): ranks are only ever pruned")
    return target, init


def check_beta(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a real number strictly between 0 and 1, got {value!r}")
    return float(value)


# --- the orthogonality regulariser (shared with hyper_adalora) ---------------------------------------

ORTH_FORMS = ("peft", "squared")


def orthogonality(grams: Sequence[Tensor], n_slots: int, form: str) -> Tensor:
    """Distance of P and Q from orthogonality, from their r×r Gram matrices (PᵀP and QQᵀ,
    any batch shape [..., r, r]).

    ``"peft"``: PEFT's AdaLoRA term, the mean over all P and Q matrices of ‖G − I‖_F (not squared).
    ``"squared"``: HyperAdaLoRA eq. (7), ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F, averaged over slots.
    """
    r = grams[0].shape[-1]
    eye = torch.eye(r, device=grams[0].device, dtype=grams[0].dtype)
    diff = torch.cat([(g - eye).reshape(-1, r * r) for g in grams])  # one row per matrix
    if form == "peft":  # vector_norm, as PEFT's torch.norm: a zero gradient (not NaN) at exact orthogonality
        return torch.linalg.vector_norm(diff, dim=1).mean()
    return (diff * diff).sum() / n_slots


def orthogonality_from_distances(distances: Tensor, n_slots: int, form: str) -> Tensor:
    """``orthogonality`` from the per-matrix distances ‖G − I‖_F (ops.importance.gram_distances)."""
    if form == "peft":
        return distances.mean()
    return (distances * distances).sum() / n_slots


def check_orth(weight: Any, form: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not weight >= 0:
        raise ValueError(f"orth_reg_weight must be a real number >= 0, got {weight!r}")
    if form not in ORTH_FORMS:
        raise ValueError(f"orth_form={form!r} is not valid; valid choices: {', '.join(ORTH_FORMS)}")


@dataclass
class AdaLoraOptions:
    """PEFT's AdaLoraConfig fields and defaults. ``rank`` (patch's argument) is target_r.

    Mutable on purpose: ``resolve_rank`` fills target_r and init_r from ``rank`` so the
    saved config records the values actually used."""

    target_r: Optional[int] = None  # default: rank
    init_r: Optional[int] = None  # default: round(1.5 * target_r), 12 for 8 as in PEFT
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    orth_form: str = "peft"  # "peft" (‖G−I‖_F, PEFT) or "squared" (‖G−I‖²_F, HyperAdaLoRA eq. 7)
    total_step: Union[int, str, None] = None  # required: an int, or "auto" under the Trainer callback

    def validate(self, plan: Plan) -> None:
        self.schedule(len(plan.slots))
        self.beta1 = check_beta("beta1", self.beta1)
        self.beta2 = check_beta("beta2", self.beta2)
        check_orth(self.orth_reg_weight, self.orth_form)

    def schedule(self, n_slots: int) -> alloc.Schedule:
        return alloc.Schedule.checked(self.init_r, self.target_r, n_slots, self.tinit, self.tfinal, self.deltaT,
                                      self.total_step)


def resolve_rank(rank: Optional[int], opts: Any) -> int:
    """The registry's hook: fills target_r and init_r, and sizes the factors at init_r."""
    opts.target_r, opts.init_r = resolve_ranks(rank, opts.target_r, opts.init_r)
    return opts.init_r


class AdaLoraState(AdapterState):
    def __init__(self, plan: Plan):
        super().__init__(plan)
        opts: AdaLoraOptions = plan.options
        r = plan.rank  # init_r (resolve_rank sized the plan with it)
        self.P = nn.ParameterList(nn.Parameter(_normal(plan, s.out_features, r)) for s in plan.slots)
        self.Q = nn.ParameterList(nn.Parameter(_normal(plan, r, s.in_features)) for s in plan.slots)
        self.lam = nn.Parameter(nn.init.zeros_(plan.new_tensor(len(plan.slots), r)))
        alpha = plan.alpha if plan.alpha > 0 else float(r)  # PEFT: scaling = lora_alpha if > 0 else r
        self.scale = alpha / (r + PEFT_RANKNUM_EPS)
        self.orth_reg_weight, self.orth_form = float(opts.orth_reg_weight), opts.orth_form
        self.allocator = alloc.ImportanceAllocator(opts.schedule(len(plan.slots)), self.svd_factors,
                                                   opts.beta1, opts.beta2)
        self.orthogonality_path = "not run yet"  # which distances op ran ("cpp" or "torch"), for explain()

    # --- the hot path -------------------------------------------------------------------------
    def factors(self, slot: int) -> Factors:
        return Factors(self.Q[slot], self.P[slot], self.lam[slot], None, self.scale)

    def svd_factors(self) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
        """Typed references for the allocator: (P per slot, Λ [slots, r], Q per slot)."""
        return list(self.P), self.lam, list(self.Q)

    # --- integration ----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> List[Any]:
        return [alloc.attach_step_hook(self), alloc.attach_loss_hook(model, self)]

    def after_optimizer_step(self) -> None:
        self.allocator.on_optimizer_step()

    def regularization(self) -> Optional[Tensor]:
        if self.orth_reg_weight == 0:
            return None
        # All 2·slots distances in one compiled call per direction on CPU (a few tiny ops per
        # matrix otherwise: ~7 ms a step for 60 slots on one core).
        distances, self.orthogonality_path = importance.gram_distances(list(self.P), list(self.Q),
                                                                       self.plan.backend)
        return self.orth_reg_weight * orthogonality_from_distances(distances, len(self.P), self.orth_form)

    def describe_slot(self, slot: int) -> Dict[str, str]:
        kept = self.effective_rank(slot)
        return {"A": "Q: per module, trained (SVD)", "B": "P: per module, trained (SVD)",
                "u": f"Λ: per module, trained, masked ({kept}/{self.plan.rank} kept)", "v": "1 (identity)",
                "importance": self.allocator.importance_path, "orthogonality": self.orthogonality_path}

    def effective_rank(self, slot: int) -> int:
        """Components kept by the current rank pattern (syncs; not on the hot path)."""
        return self.allocator.kept(slot)

    def rank_pattern(self) -> Dict[str, List[bool]]:
        """{module path: [kept?] * init_r} (syncs)."""
        return {s.path: row for s, row in zip(self.plan.slots, self.allocator.rank_pattern())}

    @torch.no_grad()
    def delta_weight(self, slot: int) -> Tensor:
        """ΔW = s·P·diag(Λ)·Q: exactly what the forward adds (a pruned component has Λ = 0 and
        adds nothing; during budgeting a component pruned at the last mask step may have
        regrown, and then it does count, in the forward and here alike)."""
        return self.scale * ((self.P[slot] * self.lam[slot]) @ self.Q[slot])

    def extra_config(self) -> Dict[str, Any]:
        return {"rank_pattern": self.rank_pattern(), "saved_components": self._saved_components(),
                "init_r": self.plan.rank, "target_r": self.plan.options.target_r,
                "allocator_step": self.allocator.global_step}

    # --- persistence: pruned components are dropped -------------------------------------------------
    def _live(self) -> Tensor:
        """[slots, init_r] components the file must hold: kept by the allocator, or still
        contributing to the forward (Λ ≠ 0: regrown since the last mask step of budgeting)."""
        return self.allocator.keep | (self.lam.detach() != 0)

    def _saved_components(self) -> Dict[str, List[bool]]:
        return {s.path: row for s, row in zip(self.plan.slots, self._live().cpu().tolist())}

    def tensors_for_save(self) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for i, live in enumerate(self._live()):
            out[f"P.{i}"] = self.P[i].detach()[:, live].contiguous()
            out[f"lam.{i}"] = self.lam.detach()[i][live].contiguous()
            out[f"Q.{i}"] = self.Q[i].detach()[live].contiguous()
        return out

    def load_saved(self, tensors: Dict[str, Tensor], extra: Dict[str, Any]) -> None:
        saved, keep_rows = self._check_saved(tensors, extra)  # raises before anything is modified
        with torch.no_grad():
            for i, (row, keep_row) in enumerate(zip(saved, keep_rows)):
                live = torch.tensor(row, dtype=torch.bool, device=self.lam.device)
                for dst, src, dim in ((self.P[i], tensors[f"P.{i}"], 1), (self.Q[i], tensors[f"Q.{i}"], 0)):
                    dst.zero_()  # dropped components come back as zeros, switched off by Λ = 0
                    dst.index_copy_(dim, live.nonzero().flatten(), src.to(dst))
                self.lam[i].zero_().masked_scatter_(live, tensors[f"lam.{i}"].to(self.lam))
                self.allocator.keep[i].copy_(torch.tensor(keep_row, dtype=torch.bool))

    def _check_saved(self, tensors: Dict[str, Tensor], extra: Dict[str, Any]):
        """(saved components, allocator keep mask) per slot, after checking every shape."""
        keep = extra.get("rank_pattern")
        saved = extra.get("saved_components", keep)  # files without it saved exactly the kept components
        paths = [s.path for s in self.plan.slots]
        for name, table in (("rank pattern", keep), ("saved-components pattern", saved)):
            if not isinstance(table, dict) or sorted(table) != sorted(paths):
                raise ValueError(f"adapter config has no {name} for this model's modules {paths[:5]}")
        r = self.plan.rank
        saved_rows, keep_rows = [], []
        for i, slot in enumerate(self.plan.slots):
            for row in (saved[slot.path], keep[slot.path]):
                if not isinstance(row, list) or len(row) != r or not all(isinstance(b, bool) for b in row):
                    raise ValueError(f"rank pattern of {slot.path} must be {r} booleans (init_r), got {row!r}")
            row = saved[slot.path]
            k = sum(row)
            want = {f"P.{i}": (slot.out_features, k), f"lam.{i}": (k,), f"Q.{i}": (k, slot.in_features)}
            for key, shape in want.items():
                if key not in tensors:
                    raise ValueError(f"adapter file does not fit this model: missing {key!r} ({slot.path})")
                if tuple(tensors[key].shape) != shape:
                    raise ValueError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)} but "
                                     f"{slot.path} with {k} saved components needs {shape}")
            saved_rows.append(row)
            keep_rows.append(keep[slot.path])
        extra_keys = sorted(set(tensors) - {f"{n}.{i}" for i in range(len(paths)) for n in ("P", "lam", "Q")})
        if extra_keys:
            raise ValueError(f"adapter file does not fit this model: unexpected {extra_keys[:5]}")
        return saved_rows, keep_rows


def _normal(plan: Plan, *shape: int) -> Tensor:
    return nn.init.normal_(plan.new_tensor(*shape), mean=0.0, std=INIT_STD)


def _builder(plan: Plan) -> AdaLoraState:
    return AdaLoraState(plan)


register(Method("adalora", "AdaLoRA: SVD triple P·Λ·Q per module, importance-based rank allocation (PEFT 0.21)",
                AdaLoraOptions, _builder, default_alpha=lambda r: 8.0,
                paper="Zhang et al. 2023 (AdaLoRA); PEFT's AdaLoraConfig defaults", resolve_rank=resolve_rank))
