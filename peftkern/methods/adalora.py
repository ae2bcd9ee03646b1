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
* Allocation (``methods/allocator.ImportanceAllocator``) runs from a global optimizer-step
  post hook after every step of an optimizer that holds these parameters; under
  transformers.Trainer add ``peftkern.AllocatorCallback()`` to keep the step in sync.
* The orthogonality regulariser is added to ``outputs.loss`` by a root forward hook when the
  output carries a loss (PEFT's ``AdaLoraModel.forward``); custom loops that compute the
  loss themselves add ``peftkern.orthogonal_regularization(model)``. ``orth_form="peft"``
  (default) is PEFT's mean over the P and Q matrices of ‖G − I‖_F; ``"squared"`` is
  HyperAdaLoRA eq. (7)'s γ(‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F), averaged over slots.
* The native files keep every component, pruned ones included, with the rank pattern in
  ``extra_config``: a pruned component's P column and Q row keep training (the orthogonality
  term and Adam's moments move them) and may come back at a later mask step, so a resume
  needs them (a save that dropped them resumed a different run). The PEFT export drops them,
  as PEFT's own AdaLoRA save does, and ``merge`` folds only the kept components. As in PEFT,
  masking zeroes Λ in place on masking steps only, so between them (deltaT > 1) a masked Λ
  entry may regrow and the forward uses it; from the final mask on they agree exactly.
* Host syncs: none on the step path (the threshold is a device scalar, the pattern a device
  bool tensor [slots, init_r]); ``rank_pattern()``, ``effective_rank``, save and explain read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import checks
from ..factors import Factors, Plan
from ..ops import importance
from . import allocator as alloc
from .registry import Method, rates, register
from .svd import SVDOptions, SVDState, normal, orthogonality_from_distances, outside_autocast, resolve_rank

Tensor = torch.Tensor

PEFT_RANKNUM_EPS = 1e-5  # PEFT divides by (ranknum + 1e-5); see the module docstring


@dataclass
class AdaLoraOptions(SVDOptions):
    """PEFT's AdaLoraConfig fields and defaults (svd.SVDOptions) plus the importance EMAs."""

    beta1: float = 0.85
    beta2: float = 0.85

    def validate(self, plan: Plan) -> None:
        super().validate(plan)
        self.beta1 = checks.real("beta1", self.beta1, 0.0, 1.0, low_open=True, high_open=True)
        self.beta2 = checks.real("beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)


class AdaLoraState(SVDState):
    def __init__(self, plan: Plan):
        super().__init__(plan)
        opts: AdaLoraOptions = plan.options
        r = plan.rank  # init_r (resolve_rank sized the plan with it)
        self.P = nn.ParameterList(nn.Parameter(normal(plan, s.out_features, r)) for s in plan.slots)
        self.Q = nn.ParameterList(nn.Parameter(normal(plan, r, s.in_features)) for s in plan.slots)
        self.lam = nn.Parameter(nn.init.zeros_(plan.new_tensor(len(plan.slots), r)))
        alpha = plan.alpha if plan.alpha > 0 else float(r)  # PEFT: scaling = lora_alpha if > 0 else r
        self.scale = alpha / (r + PEFT_RANKNUM_EPS)
        self.orth_reg_weight, self.orth_form = float(opts.orth_reg_weight), opts.orth_form
        self.allocator = alloc.ImportanceAllocator(opts.schedule(len(plan.slots)), self.svd_factors,
                                                   opts.beta1, opts.beta2, self.backends)
        self.orthogonality_path = "not run yet"  # which distances op ran ("cpp" or "torch"), for explain()

    # --- the hot path -------------------------------------------------------------------------
    def factors(self, slot: int) -> Factors:
        return Factors(self.Q[slot], self.P[slot], self.lam[slot], None, self.scale)

    def svd_factors(self) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
        """Typed references for the allocator: (P per slot, Λ [slots, r], Q per slot)."""
        return list(self.P), self.lam, list(self.Q)

    # --- integration ----------------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        self.allocator.on_optimizer_step()

    def regularization(self) -> Optional[Tensor]:
        if self.orth_reg_weight == 0:
            return None
        # All 2·slots distances in one compiled call per direction on CPU (a few tiny ops per
        # matrix otherwise: ~7 ms a step for 60 slots on one core).
        device_type = self.lam.device.type
        backend = self.backends.get(device_type)
        with outside_autocast(device_type):
            distances, self.orthogonality_path = importance.gram_distances(backend, list(self.P), list(self.Q))
            return self.orth_reg_weight * orthogonality_from_distances(distances, len(self.P), self.orth_form)

    def describe_slot(self, slot: int) -> Dict[str, str]:
        kept = self.effective_rank(slot)
        return {"A": "Q: per module, trained (SVD)", "B": "P: per module, trained (SVD)",
                "u": f"Λ: per module, trained, masked ({kept}/{self.plan.rank} kept)", "v": "1 (identity)",
                "importance": self.allocator.importance_path, "orthogonality": self.orthogonality_path}

    @torch.no_grad()
    def delta_weight(self, slot: int) -> Tensor:
        """ΔW = s·P·diag(Λ)·Q: exactly what the forward adds (a pruned component has Λ = 0 and
        adds nothing; during budgeting a component pruned at the last mask step may have
        regrown, and then it does count, in the forward and here alike)."""
        return self.scale * ((self.P[slot] * self.lam[slot]) @ self.Q[slot])

    def extra_config(self) -> Dict[str, Any]:
        return {**super().extra_config(), "saved_components": self._saved_components()}

    # --- persistence: every component (module docstring) ---------------------------------------------
    def _saved_components(self) -> Dict[str, List[bool]]:
        return {s.path: [True] * self.plan.rank for s in self.plan.slots}

    def tensors_for_save(self) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for i in range(len(self.P)):
            out[f"P.{i}"] = self.P[i].detach()
            out[f"lam.{i}"] = self.lam.detach()[i]
            out[f"Q.{i}"] = self.Q[i].detach()
        return out

    def load_saved(self, tensors: Dict[str, Tensor], extra: Dict[str, Any]) -> None:
        # files written before every component was saved hold only the kept ones (and Λ ≠ 0 ones):
        # the others come back as zeros, switched off by Λ = 0
        saved, keep_rows = self._check_saved(tensors, extra)  # raises before anything is modified
        with torch.no_grad():
            for i, (row, keep_row) in enumerate(zip(saved, keep_rows)):
                live = torch.tensor(row, dtype=torch.bool, device=self.lam.device)
                for dst, src, dim in ((self.P[i], tensors[f"P.{i}"], 1), (self.Q[i], tensors[f"Q.{i}"], 0)):
                    dst.zero_()
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


def _builder(plan: Plan) -> AdaLoraState:
    return AdaLoraState(plan)


register(Method("adalora", "AdaLoRA: SVD triple P·Λ·Q per module, importance-based rank allocation (PEFT 0.21)",
                AdaLoraOptions, _builder, default_alpha=lambda r: 8.0,
                paper="Zhang et al. 2023 (AdaLoRA); PEFT's AdaLoraConfig defaults",
                resolve_rank=resolve_rank, training_length="total_step", rslora=False,
                lr=rates("adalora", 1e-5, "HyperAdaLoRA Implementation Details (its AdaLoRA baseline)")))
