"""AdaptedLinear: a frozen base Linear/Conv1D plus a handle into the method's factor source."""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import quant
from .factors import FACTOR_NAMES, AdapterState, Factors
from .ops import functions
from .ops.backend import Backend
from .targets import features, is_transposed

Tensor = torch.Tensor
# (the layer's input, its factors), both before the compute dtype's cast: what a joint group's members share
GroupKey = Tuple[Tensor, Factors]
# torch's global module hooks (register_module_forward_hook, ...), dicts it fills in place: under PEFT they run
# on the base layer too
_G_FORWARD, _G_FORWARD_PRE = _module._global_forward_hooks, _module._global_forward_pre_hooks
_G_BACKWARD, _G_BACKWARD_PRE = _module._global_backward_hooks, _module._global_backward_pre_hooks


class AdaptedLinear(nn.Module):
    """Computes ``y = W0·x + b + s·(v ⊙ (B·(u ⊙ (A·D(x)))))`` through the chosen backend.

    D is the adapter's dropout (PEFT's lora_dropout, ``patch(..., dropout=p)``), active only
    in training mode. The original module is kept as ``base_layer`` (changed only by a merge) so
    that unpatch() can put it back: exactly, or to rounding after a merge and unmerge. The state
    is *not* registered as a submodule here: it is registered once, on the model root, so that
    each adapter parameter appears exactly once in ``model.parameters()`` however many modules
    share it.
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState, slot: int):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_state", state)
        self.slot = slot
        self.transposed = is_transposed(base_layer)
        self.in_features, self.out_features = features(base_layer)
        self.quantized = state.plan.slots[slot].quantized  # "4bit" / "8bit": a bitsandbytes base (quant.py)
        # (N, K, r): what the registry resolves this module's backend for (rank limits, the CUDA policy)
        self.shape: Tuple[int, int, int] = (self.out_features, self.in_features,
                                            state.plan.slot_rank(state.plan.slots[slot]))
        self.merged = False

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

    @property
    def backend(self) -> str:
        """The backend asked for at patch time ("auto", or a registered name)."""
        return self._state.plan.backend

    def ops(self, device_type: str) -> Backend:
        """The backend for tensors on ``device_type`` (the adapter's registry decision for this shape)."""
        return self._state.backends.get(device_type, self.shape, self.base_fused)

    @property
    def base_fused(self) -> bool:
        """W0·x runs inside the adapter's kernels (a dense base layer without hooks); else apart from them.
        Asked in every forward: about 0.4 µs (dict reads, no nn.Module attribute lookup; timeit, this machine)."""
        return self.__dict__["quantized"] is None and not self.hooked

    @property
    def hooked(self) -> bool:
        """Hooks would run on the base layer: its own (forward, pre-forward, backward, or accelerate's, which
        wraps its forward to bring offloaded weights in) or torch's global module hooks. PEFT calls
        ``base_layer(x)``, so they run there; the fused kernels would compute W0·x without them, so the
        layer calls the base layer instead (``_apart_forward``) and ``explain`` says so."""
        # dict reads, not attributes: base_layer and a missing _hf_hook would each go through nn.Module.__getattr__
        own = self.__dict__["_modules"]["base_layer"].__dict__
        return (bool(own["_forward_hooks"] or own["_forward_pre_hooks"] or own["_backward_hooks"]
                     or own["_backward_pre_hooks"] or _G_FORWARD or _G_FORWARD_PRE or _G_BACKWARD or _G_BACKWARD_PRE)
                or "_hf_hook" in own)

    def dense_weight(self) -> Tensor:
        """W0 [N, K] as a dense tensor: the weight itself (a view), or a quantized one dequantized now."""
        return quant.dequantized(self.base_layer) if self.quantized is not None else self.base_weight()

    def base_weight(self) -> Tensor:
        """W0 in Linear layout [N, K] (a view for Conv1D, never a copy)."""
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def dora_inputs(self) -> tuple:
        """(W0 [N, K], A, B, u, v, scale): DoRA's norm inputs as this module's forward passes them now,
        read by a same-shaped module that refreshes every stale norm of its shape at once."""
        f = self._state.factors(self.slot)
        return self.base_weight(), f.A, f.B, f.u, f.v, f.scale

    def forward(self, x: Tensor) -> Tensor:
        """x [..., K] -> [..., N] in x's dtype (under autocast: the autocast dtype, unless x is float64).

        Raises ValueError when x, the base weight and the factors are on different devices
        (a model moved only in part) or x's last dimension is not K, and TypeError when x and
        the base weight have different dtypes outside autocast."""
        if not self.base_fused:
            return self._apart_forward(x)
        if self.merged or self._state.disabled:
            return self.base_layer(x)
        f = self._state.factors(self.slot)
        weight, bias = self.base_weight(), self.base_layer.bias
        if x.device != weight.device or f.A.device != weight.device or f.B.device != weight.device:
            raise placement_error(self, x, f)  # a model moved only in part (torch would compute on meta silently)
        self._check_width(x)
        device_type = x.device.type
        dtype = _autocast_dtype(x)
        if dtype is not None:
            magnitude = self._magnitude(weight, f, dtype)
            with torch.autocast(device_type, enabled=False):
                return self._run(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                                 self._state.casts.factors(f, dtype), device_type, magnitude, key=(x, f))
        if x.dtype != weight.dtype:
            raise placement_error(self, x, f)
        magnitude = self._magnitude(weight, f, x.dtype)
        if f.A.dtype != x.dtype:
            f = self._state.casts.factors(f, x.dtype)
        return self._run(x, weight, bias, f, device_type, magnitude)

    def _check_width(self, x: Tensor) -> None:
        if x.dim() == 0:  # as nn.Linear refuses it, with the module named
            raise ValueError(f"{self._state.plan.slots[self.slot].path}: the input is a 0-d tensor; it must be at "
                             f"least 1-D, [..., {self.in_features}]")
        if x.shape[-1] != self.in_features:  # else a reshape error that names no module
            raise ValueError(f"{self._state.plan.slots[self.slot].path}: the input has {x.shape[-1]} features "
                             f"(shape {tuple(x.shape)}), this module takes {self.in_features}")

    def _magnitude(self, weight: Tensor, f: Factors, dtype: torch.dtype) -> Optional[Tuple[Tensor, Callable]]:
        """DoRA's magnitude m (trained) and the provider of (its norm ‖W0 + ΔW‖ from the master weights,
        g = m / norm in the compute ``dtype``), both cached; asked for only when the forward does not
        form W0 + ΔW itself (functions.dora_adapter). None without DoRA."""
        dora = self._state.dora
        if dora is None:
            return None
        m = dora.magnitude(self.slot)
        if not torch.compiler.is_compiling():
            hit = dora.cached_gain(self.slot, m, weight, f.A, f.B, f.u, f.v, f.scale, dtype)
            if hit is not None:
                return m, lambda: hit
        return m, functools.partial(
            dora.gain, self.slot, weight, f.A, f.B, f.u, f.v, f.scale, dtype,
            source=None if torch.compiler.is_compiling() else weakref.WeakMethod(self.dora_inputs))  # (no cache there)

    def _run(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], f: Factors, device_type: str,
             magnitude: Optional[Tuple[Tensor, Callable[[], Tuple[Tensor, Tensor]]]],
             key: Optional[GroupKey] = None) -> Tensor:
        """The adapted product of x (cast to the compute dtype). ``key``: the layer's input and factors before
        that cast, which the joint group's members share (each member's cast of x is a new tensor)."""
        ops = self._state.backends.get(device_type, self.shape, True)  # self.ops(device_type): the base is fused here
        dropout = self._state.dropout() if self.training else 0.0
        if magnitude is not None:  # DoRA: (m, the norm's provider)
            return functions.dora_adapter(x, weight, bias, f.A, f.B, f.u, f.v, *magnitude, f.scale, dropout,
                                          backend=ops)
        if f.group is None:
            return functions.adapter(x, weight, bias, f.A, f.B, f.u, f.v, f.scale, dropout, backend=ops)
        hu = f.group.hidden(*(key or (x, f)), lambda: functions.shrink(x, f.A, f.u, dropout, backend=ops))
        return functions.expand(x, weight, bias, hu, f.B, f.v, f.scale, backend=ops)

    def apart_route(self, ops: Optional[Backend], joint: bool, hooked: Optional[bool] = None) -> Optional[str]:
        """How this module computes when W0·x is not fused into the adapter's kernels (``base_fused`` False),
        on backend ``ops`` (``joint``: its factors belong to a joint group; ``hooked``: ``self.hooked``, when
        the caller has it already); None when it is fused. The one decision: ``_apart_forward`` runs
        ``APART_ROUTES[route]``, ``explain`` names it from ``APART_TEXT``."""
        hooked = self.hooked if hooked is None else hooked
        if self.quantized is None and not hooked:
            return None
        dora = self._state.dora is not None
        if hooked:  # (joint groups take no DoRA: the options refuse them together)
            return "hooked joint" if joint else "hooked dora" if dora else "hooked"
        if joint:
            return "joint"
        if dora:
            return "quantized dora"
        return "4bit fused" if self.quantized == "4bit" and ops is not None and ops.fuses_4bit else "quantized"

    def _apart_forward(self, x: Tensor) -> Tensor:
        """The base product apart from the adapter's kernels (``apart_route``): a bitsandbytes base runs its
        own op (quant.py), or a backend that ``fuses_4bit`` reads it packed in one kernel with the adapter;
        a ``hooked`` base layer is called as PEFT calls it, under the caller's autocast, its hooks seeing
        (and able to replace) W0·x + b. The low-rank term (and DoRA's column scale) is added by torch ops
        and the adapter's low-rank kernels (weight=None)."""
        base = self.base_layer
        hooked = self.hooked
        if self._state.disabled or self.merged:
            return base(x) if hooked or self.quantized is None else quant.base_forward(base, x)
        f = self._state.factors(self.slot)
        # a hooked base's weight may be offloaded (meta until accelerate's hook brings it in)
        if x.device != f.A.device or (base.weight.device != f.A.device and not hooked):
            raise placement_error(self, x, f)
        self._check_width(x)
        device_type = x.device.type
        dtype = _autocast_dtype(x) or x.dtype
        key = (x, f)  # the members of a joint group share the input and factors before their casts
        called = base(x) if hooked else None
        with torch.autocast(device_type, enabled=False) if device_type != "meta" else contextlib.nullcontext():
            x = x.to(dtype)
            f = self._state.casts.factors(f, dtype) if f.A.dtype != dtype else f
            dropout = self._state.dropout() if self.training else 0.0
            ops = self.ops(device_type)
            route = self.apart_route(ops, f.group is not None, hooked)
            return APART_ROUTES[route](self, x, f, dropout, ops, key=key,
                                       called=None if called is None else called.to(dtype))

    def _apart_joint(self, x: Tensor, f: Factors, dropout: float, ops: Backend, key: GroupKey,
                     called: Optional[Tensor]) -> Tensor:
        """A joint group's member: the group's one shrink (one dropout mask for q, k and v), as ``_run``; the
        up-projection by torch ops, since the expand kernels fuse it with a dense base GEMM."""
        hu = f.group.hidden(*key, lambda: functions.shrink(x, f.A, f.u, dropout, backend=ops))
        up = f.B if f.v is None else f.B * f.v[:, None]
        return (called if called is not None else quant.base_forward(self.base_layer, x)) + f.scale * (hu @ up.t())

    def _apart_lowrank(self, x: Tensor, f: Factors, dropout: float, ops: Backend, key: GroupKey,
                       called: Optional[Tensor]) -> Tensor:
        """The hooked base layer's output, or bitsandbytes' product, plus the low-rank term."""
        base = called if called is not None else quant.base_forward(self.base_layer, x)
        return base + functions.adapter(x, None, None, f.A, f.B, f.u, f.v, f.scale, dropout, backend=ops)

    def _apart_4bit_fused(self, x: Tensor, f: Factors, dropout: float, ops: Backend, key: GroupKey,
                          called: Optional[Tensor]) -> Tensor:
        """One kernel: the 4-bit W0 read packed in the adapter's GEMM, the bias added as bitsandbytes adds it
        (in the layer's compute dtype)."""
        base = self.base_layer
        w4 = quant.packed_4bit(base)
        bias = None if base.bias is None else base.bias.to(w4[-2] or x.dtype)
        return functions.adapter_4bit(x, w4, bias, f.A, f.B, f.u, f.v, f.scale, dropout, backend=ops)

    def _apart_gain(self, f: Factors, dtype: torch.dtype) -> Tensor:
        """DoRA's g = m / ‖W0 + ΔW‖_row [N] in ``dtype``, for the forwards with the base apart (the norm cached
        as the fused path caches it; a quantized W0 dequantized only when the norm is recomputed)."""
        return (self._state.dora.m[self.slot] / self._dora_norm(f)).to(dtype)

    def _dora_norm(self, f: Factors) -> Tensor:
        """‖W0 + ΔW‖_row [N] as the forwards use it (cached; a quantized W0 dequantized only on a recompute)."""
        dora = self._state.dora
        if self.quantized is None:
            return dora.norm(self.slot, self.base_weight(), f.A, f.B, f.u, f.v, f.scale)
        return dora.norm(self.slot, self.base_layer.weight, f.A, f.B, f.u, f.v, f.scale, dense=self.dense_weight)

    def _quantized_dora(self, x: Tensor, f: Factors, dropout: float, ops: Backend, key: Optional[GroupKey] = None,
                        called: Optional[Tensor] = None) -> Tensor:
        """DoRA on a bitsandbytes base with PEFT's dropout formula, as DoraFunction computes it on a dense base:
        y = g⊙(W0·D(x) + ΔW·D(x)) + b + W0·(x − D(x)), a second base product where dropout applies."""
        base = self.base_layer
        xd = _dropped(x, dropout)
        g = self._apart_gain(f, x.dtype)
        z = quant.base_forward(base, xd, with_bias=False) + functions.adapter(xd, None, None, f.A, f.B, f.u, f.v,
                                                                              f.scale, 0.0, backend=ops)
        y = z * g
        if dropout:
            y = y + quant.base_forward(base, x - xd, with_bias=False)
        return y if base.bias is None else y + base.bias.to(x.dtype)

    def _hooked_dora(self, x: Tensor, f: Factors, dropout: float, ops: Backend, key: Optional[GroupKey] = None,
                     called: Optional[Tensor] = None) -> Tensor:
        """DoRA over a hooked base layer's output ``called`` (W0·x + b after its hooks), PEFT's formula:
        y = called + (g − 1)⊙base + g⊙(ΔW·D(x)), base = called − b without dropout (what the hooks left),
        W0·D(x) with it."""
        weight = self.base_layer.weight
        if weight.device != x.device:  # the norm reads W0 outside the base layer's forward
            raise ValueError(f"{self._state.plan.slots[self.slot].path}: DoRA reads W0 outside the base layer's "
                             f"forward (its norm ‖W0 + ΔW‖), and this layer's weight is on {weight.device} (offloaded "
                             "by accelerate?); load the model without offloading this layer, or patch without use_dora")
        xd = _dropped(x, dropout)
        g = self._apart_gain(f, x.dtype)
        lowrank = functions.adapter(xd, None, None, f.A, f.B, f.u, f.v, f.scale, 0.0, backend=ops)
        if dropout:
            base = torch.nn.functional.linear(xd, self.dense_weight().to(x.dtype))
        else:
            bias = self.base_layer.bias
            base = called if bias is None else called - bias.to(x.dtype)
        return called + (g - 1) * base + g * lowrank

    # --- merge / unmerge ------------------------------------------------------------
    @torch.no_grad()
    def merged_quantized_base(self, requantize: bool, dtype: Optional[torch.dtype] = None
                              ) -> Tuple[nn.Module, Optional[float]]:
        """(the base layer with ΔW folded in, the requantization error or None): W0 dequantized, merged
        in fp32 (DoRA: g⊙(W0 + ΔW)), then a full-precision Linear in ``dtype`` (the layer's compute
        dtype if None), or with ``requantize`` a 4-bit layer again."""
        w0 = quant.dequantized(self.base_layer).float()
        delta = self._state.delta_weight(self.slot).float()
        dora = self._state.dora
        if dora is None:
            merged = w0 + delta
        else:  # the forward's norm, so the merged layer computes what the adapted one did
            merged = dora.merged_weight(self.slot, w0, delta, self._dora_norm(self._state.factors(self.slot)))
        if requantize:
            return quant.requantized(self.base_layer, merged)
        return quant.full_precision(self.base_layer, merged, dtype or quant.compute_dtype(self.base_layer)), None

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
        # ΔW in the adapter's dtype (fp32 on a half model): W0 ± ΔW is formed at that precision and
        # rounded once to W0's dtype, as PEFT's merge rounds (rounding ΔW first rounds twice)
        delta = self._state.delta_weight(self.slot)
        dora = self._state.dora
        if dora is not None:  # W0 ← g⊙(W0 + ΔW), and back with the norm the merge used
            if sign > 0:
                dora.merge(self.slot, self.base_weight(), delta, self._dora_norm(self._state.factors(self.slot)))
            else:
                dora.unmerge(self.slot, self.base_weight(), delta)
            return
        delta = delta.t() if self.transposed else delta
        if delta.dtype == weight.dtype:
            weight.add_(delta, alpha=sign)
        else:
            weight.copy_(torch.add(weight.to(delta.dtype), delta, alpha=sign))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self._state.plan.method}, "
                f"rank={self._state.effective_rank(self.slot)}, backend={self.backend}, merged={self.merged}")


# route -> how AdaptedLinear computes it, when W0·x runs apart from the adapter's kernels (apart_route)
APART_ROUTES = {"joint": AdaptedLinear._apart_joint, "hooked joint": AdaptedLinear._apart_joint,
                "hooked": AdaptedLinear._apart_lowrank,
                "quantized": AdaptedLinear._apart_lowrank, "4bit fused": AdaptedLinear._apart_4bit_fused,
                "quantized dora": AdaptedLinear._quantized_dora, "hooked dora": AdaptedLinear._hooked_dora}
# route -> what explain() says of it
APART_TEXT = {
    "joint": "{kind} base by bitsandbytes + the joint group's one shrink, the up-projection by torch ops",
    "hooked joint": "base layer called (it has hooks, which run as under PEFT) + the joint group's one shrink, "
                    "the up-projection by torch ops",
    "hooked": "base layer called (it has hooks, which run as under PEFT) + low-rank term",
    "hooked dora": "base layer called (it has hooks, which run as under PEFT) + low-rank term, DoRA's "
                   "(g − 1)⊙W0·x + g⊙ΔW·x by torch ops",
    "quantized": "{kind} base by bitsandbytes + low-rank term",
    "quantized dora": "{kind} base by bitsandbytes + low-rank term, DoRA's column scale by torch ops",
    "4bit fused": "4bit base fused: W0 dequantized tile by tile in the adapter's GEMM",
}


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype this layer computes x in, or None: none in force on x's device (meta, for shape
    inference and host-overhead benchmarks, has no autocast, and asking raises), or x in float64, which
    autocast leaves alone, as nn.Linear and PEFT's layers are left (a review's finding: a float64 model
    under autocast had bf16 adapted layers beside float64 others, and attention raised)."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _dropped(x: Tensor, p: float) -> Tensor:
    """D(x) for DoRA's forwards with the base apart, with ``DoraFunction``'s mask (``functions.dora_keep``)."""
    if not p:
        return x
    return x * functions.dora_keep(x, p) / (1.0 - p)


def _where(t: Optional[Tensor]) -> str:
    return "-" if t is None else f"{t.device}/{str(t.dtype).replace('torch.', '')}"


def placement_error(module: AdaptedLinear, x: Tensor, factors: Factors) -> Exception:
    """The error an AdaptedLinear raises when its input, base weight and factors disagree on the
    device (ValueError) or the input and base weight on the dtype (TypeError)."""
    path = module.state.plan.slots[module.slot].path
    parts = {"input": x, "base weight": module.base_weight(),
             **{f"factor {n}": getattr(factors, n) for n in FACTOR_NAMES}}
    listing = ", ".join(f"{k} {_where(t)}" for k, t in parts.items() if t is not None)
    hint = ("the model was moved or cast only in part: call model.to(device, dtype) on the whole patched model "
            "(the adapter is registered on its root as model.peftkern)")
    if len({t.device for t in parts.values() if t is not None}) > 1:
        return ValueError(f"{path}: tensors on different devices ({listing}); {hint}")
    w = parts["base weight"].dtype
    fix = (f"the input must be floating point (cast it to {w})" if not x.is_floating_point() else
           f"cast the input to {w}{'' if x.dtype == torch.float64 else ' or run under torch.autocast'}; "
           f"or, if {hint}")  # autocast leaves a float64 input alone
    return TypeError(f"{path}: input and base weight have different dtypes ({listing}); {fix}")


__all__ = ["AdaptedLinear", "APART_ROUTES", "APART_TEXT", "placement_error"]
