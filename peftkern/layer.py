"""AdaptedLinear: a frozen base Linear/Conv1D plus a handle into the method's factor source."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .factors import AdapterState, Factors
from .ops import dispatch
from .targets import features, is_transposed

Tensor = torch.Tensor


class AdaptedLinear(nn.Module):
    """Computes ``y = W0·x + b + s·(v ⊙ (B·(u ⊙ (A·x))))`` through the chosen backend.

    The original module is kept untouched as ``base_layer`` so that unpatch() can put it
    back exactly. The state is *not* registered as a submodule here: it is registered
    once, on the model root, so that each adapter parameter appears exactly once in
    ``model.parameters()`` however many modules share it.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState, slot: int, backend: str = "auto"):
        super().__init__()
        dispatch.check_name(backend)
        self.base_layer = base_layer
        object.__setattr__(self, "_state", state)
        self.slot = slot
        self.backend = backend
        self.transposed = is_transposed(base_layer)
        self.in_features, self.out_features = features(base_layer)
        self.merged = False
        self._ops: Dict[str, dispatch.Backend] = {}

    # HF code sometimes reads proj.weight / proj.bias directly (dtype checks, fused paths).
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def state(self) -> AdapterState:
        return self._state

    def ops(self, device_type: str) -> dispatch.Backend:
        """The backend for tensors on ``device_type``, resolved once per device type."""
        backend = self._ops.get(device_type)
        if backend is None:
            backend = self._ops[device_type] = dispatch.resolve(self.backend, device_type)
        return backend

    def base_weight(self) -> Tensor:
        """W0 in Linear layout [N, K] (a view for Conv1D, never a copy)."""
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self._state.disabled:
            return self.base_layer(x)
        f = self._state.factors(self.slot)
        weight, bias = self.base_weight(), self.base_layer.bias
        if x.device != weight.device or f.A.device != weight.device or f.B.device != weight.device:
            raise _placement_error(self, x, f)  # a model moved only in part (torch would compute on meta silently)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._run(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                 _cast(f, dtype), device_type)
        if x.dtype != weight.dtype:
            raise _placement_error(self, x, f)
        if f.A.dtype != x.dtype:
            f = _cast(f, x.dtype)
        return self._run(x, weight, bias, f, device_type)

    def _run(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], f: Factors, device_type: str) -> Tensor:
        ops = self.ops(device_type)
        if f.group is None:
            return ops.adapter(x, weight, bias, f.A, f.B, f.u, f.v, f.scale)
        hu = f.group.hidden(x, f.A, f.u, ops.shrink)
        return ops.expand(x, weight, bias, hu, f.B, f.v, f.scale)

    # --- merge / unmerge ------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._apply_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._apply_delta(-1.0)
        self.merged = False

    def _apply_delta(self, sign: float) -> None:
        weight = self.base_layer.weight
        delta = self._state.delta_weight(self.slot).to(weight.dtype)
        weight.add_(delta.t() if self.transposed else delta, alpha=sign)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self._state.plan.method}, "
                f"rank={self._state.effective_rank(self.slot)}, backend={self.backend}, merged={self.merged}")


def _placement_error(layer: AdaptedLinear, x: Tensor, f: Factors) -> Exception:
    from .health import placement_error  # health imports patching, which imports this module

    return placement_error(layer, x, f)


def _cast(f: Factors, dtype: torch.dtype) -> Factors:
    def c(t):
        return None if t is None else t.to(dtype)

    return Factors(c(f.A), c(f.B), c(f.u), c(f.v), f.scale, f.group)
