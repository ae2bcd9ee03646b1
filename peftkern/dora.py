"""DoRA's magnitude and weight norm (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

    y = m ⊙ (W0·x + ΔW·x) / ‖W0 + ΔW‖_row + b,      ΔW = s·Λv·B·Λu·A (any factor source)

m ∈ R^N is trained, one vector per adapted module, initialised to ‖W0 + ΔW‖_row at patch time
(‖W0‖_row: every method starts at ΔW = 0), as PEFT does. The norm is a constant in the backward
(DoRA §4.3), so only g = m / ‖·‖ carries a gradient, to m.

**The norm without W0 + ΔW.** With B' = Λv·B·Λu ([N, r]) and ΔW = s·B'·A,

    ‖W0 + ΔW‖²_row = ‖W0‖²_row + 2s·rowsum(B' ⊙ (W0·Aᵀ)) + s²·rowsum((B'·(A·Aᵀ)) ⊙ B')

‖W0‖²_row is computed once per base weight (again only if W0 changes, e.g. by a merge); the rest
needs one [N, K]·[K, r] product and [N, r]-sized work, never an [N, K] temporary (PEFT forms
W0 + s·BA, and BA from an identity pushed through the adapter, on every forward). Everything is
in fp32 (fp64 for fp64 weights); a bf16 base weight is converted in row chunks.

*Cancellation bound.* Each of the three terms is a sum of products, computed in precision u
(fp32: 2⁻²⁴) with error at most γ·(its absolute value), γ ≈ (K + r + 3)·u (the standard dot-product
bound, Higham §3.1; the cross and square terms are added per element before their row sum).
By Cauchy–Schwarz their absolute values add up to at most (‖W0_n‖ + ‖ΔW_n‖)², so with
t = ‖W0_n + ΔW_n‖²

    |t̂ − t| ≤ γ·(‖W0_n‖ + ‖ΔW_n‖)²,   and the norm's relative error ≤ (γ/2)·(‖W0_n‖ + ‖ΔW_n‖)² / t.

While the adapter is a correction (‖ΔW_n‖ ≪ ‖W0_n‖) that is about γ/2: 2·10⁻⁵ for K = 576 in fp32.
It grows only where ΔW nearly cancels a row of W0 (t ≪ ‖W0_n‖²), where the dense norm would be
the one to trust; ``norm_error_bound`` gives the bound per row, and tests check it in fp64 and fp32,
rows with BA ≈ −W0 included. t̂ is clamped at 0 before the square root.

**When it is recomputed.** Per module, the norm is kept with a stamp of W0, A, B, u and v and the
number of optimizer steps taken so far (``peftkern.stamps``: identity, version counter, storage,
dtype; host values, no device sync) and recomputed only when one of them changed: once per
optimizer step in training, and gradient accumulation and checkpoint recomputation reuse it. The
step count is what catches a fused optimizer (HF Trainer's and TRL's default), which bumps no
version counter.
The first module of a shape to find its norm stale recomputes every stale module of that shape
(same N, K, r, dtype, device, scale) in one batched computation (``weight_norms``): on a GPU a
step is bound by launching kernels, and this takes the norm's 11 launches per module to about 2
(1 where the GEMM writes fp32 from bf16 inputs, ``HALF_IN_FP32_OUT``).
The column scale g = m / norm the forward needs is kept beside the norm (``gain``), stamped also with
m and the dtype asked for, and formed for the whole group in the same refresh: one division per
shape instead of one per module.
Generated factors (PG) are new tensors each forward, so their norm is recomputed per forward and
per module there; so are 4-bit bases and FSDP2 shards, which a module reads only in its forward.
Under torch.compile it is computed in the graph every time (version counters are not traceable).

**When it is not computed here.** The C++ backend's merged path (ranks above 32, many rows) forms
W_eff = W0 + ΔW for its GEMM anyway; ``ops.functions.dora_adapter`` then takes the norm as W_eff's
row norms (an [N, K] pass, no cancellation) and never asks this cache (the layer passes a
provider of (norm, g): ``Magnitudes.gain``, or the hit ``cached_gain`` found, called only on the
other paths).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from . import stamps
from .ops.functions import ratio as _ratio
from .ops.library import acc_dtype

Tensor = torch.Tensor
ROW_CHUNK = 4096  # rows of a low-precision W0 converted to fp32 at a time


def _folded_B(B: Tensor, u: Optional[Tensor], v: Optional[Tensor]) -> Tensor:
    out = B if v is None else B * v[:, None]
    return out if u is None else out * u[None, :]


def row_norms_sq(weight: Tensor) -> Tensor:
    """‖W0‖²_row [N] in fp32 (fp64 for fp64), converting a low-precision weight in row chunks."""
    acc = acc_dtype(weight.dtype)
    if weight.dtype == acc:
        return (weight * weight).sum(1)
    return torch.cat([c.to(acc).pow(2).sum(1) for c in weight.split(ROW_CHUNK)]) if weight.shape[0] else \
        weight.new_zeros(0, dtype=acc)


# Devices whose GEMM takes bf16/fp16 inputs with an fp32 output (``torch.mm(..., out_dtype=torch.float32)``,
# cuBLAS accumulating in fp32): W0·Aᵀ then needs no fp32 copy of W0. meta, for the launch counts.
HALF_IN_FP32_OUT = frozenset({"cuda", "xpu", "meta"})


SPLIT_PARTS = 3  # an fp32 A as the sum of this many bf16/fp16 tensors: 3 × 8 bits carry fp32's 24


def _mm_fp32(a: Tensor, weight: Tensor) -> Tensor:
    """a·W0ᵀ written in fp32 from bf16/fp16 inputs (exact products, an fp32 sum): cuBLAS's own mode."""
    return torch.mm(a, weight.t(), out_dtype=torch.float32)


def _split(a: Tensor, dtype: torch.dtype) -> Tensor:
    """An fp32 ``a`` [..., r, K] as ``SPLIT_PARTS`` tensors of ``dtype`` stacked along r ([..., 3r, K]): its
    rounding, the rounding of what that left, and so on, so that they sum to ``a`` within fp32's own
    rounding (bf16; fp16, whose range is narrower, to its smallest subnormal, 6e-8 absolute). An fp32 A
    (the adapter's dtype on a half-precision model) then meets a bf16/fp16 W0 in one GEMM of W0's dtype,
    with no converted copy of W0; the GEMM reads W0 once whatever its rows, and r is small."""
    r = a.shape[-2]
    out = torch.empty((*a.shape[:-2], SPLIT_PARTS * r, a.shape[-1]), dtype=dtype, device=a.device)
    rest = a
    for i in range(SPLIT_PARTS):
        part = out[..., i * r:(i + 1) * r, :]
        part.copy_(rest)
        if i + 1 < SPLIT_PARTS:
            rest = rest - part
    return out


def _sum_parts(p: Tensor, r: int) -> Tensor:
    """[..., 3r, N] GEMM outputs of ``_split``'s parts -> their sum [..., r, N] (one reduction)."""
    return p.unflatten(-2, (SPLIT_PARTS, r)).sum(-3)


def _splits(weight: Tensor, a: Tensor, A: Optional[Tensor]) -> bool:
    """Whether W0·Aᵀ takes ``_split``: a bf16/fp16 W0, an fp32 A, on a device whose GEMM writes fp32."""
    return weight.dtype in (torch.bfloat16, torch.float16) and a.dtype == torch.float32 and \
        weight.device.type in HALF_IN_FP32_OUT and (A is None or A.dtype != weight.dtype)


def _w0_at(weight: Tensor, a: Tensor, A: Optional[Tensor] = None) -> Tensor:
    """W0·Aᵀ [N, r] in the accumulation dtype (a transposed view), ``a`` = A in that dtype, ``A`` itself.

    Formed as (A·W0ᵀ)ᵀ: the GEMM's output is then [r, N], wide, where W0·Aᵀ's [N, r] is r columns
    wide and vectorises poorly (1.5-2× slower on the CPU at r = 8, N×K = 1536×576, one thread).
    A bf16/fp16 W0 where the GEMM can write fp32 (``HALF_IN_FP32_OUT``): one GEMM with exact products
    and an fp32 sum, no converted copy of W0 (a launch and N·K·4 bytes fewer): A itself when it has
    W0's dtype, else (an fp32 A) its ``_split`` parts."""
    if weight.dtype == a.dtype:
        return (a @ weight.t()).t()
    if A is not None and A.dtype == weight.dtype and weight.device.type in HALF_IN_FP32_OUT \
            and a.dtype == torch.float32:
        return _mm_fp32(A, weight).t()
    if _splits(weight, a, A):
        return _sum_parts(_mm_fp32(_split(a, weight.dtype), weight), a.shape[0]).t()
    if weight.shape[0] <= ROW_CHUNK:  # one chunk: no split and cat (each an op, a launch on a GPU)
        return (a @ weight.to(a.dtype).t()).t()
    return torch.cat([a @ c.to(a.dtype).t() for c in weight.split(ROW_CHUNK)], dim=1).t()


@torch.no_grad()
def weight_norm(weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor], scale: float,
                w0_sq: Optional[Tensor] = None) -> Tensor:
    """‖W0 + s·Λv·B·Λu·A‖ per row [N] (module docstring), in the accumulation dtype. ``w0_sq`` is
    ``row_norms_sq(weight)`` when known."""
    acc = acc_dtype(weight.dtype)
    w0_sq = row_norms_sq(weight) if w0_sq is None else w0_sq.to(acc)
    Bf = _folded_B(B.to(acc), None if u is None else u.to(acc), None if v is None else v.to(acc))
    a = A.to(acc)
    # the cross and square terms in one [N, r] product: rowsum(B' ⊙ (2s·W0Aᵀ + s²·B'·AAᵀ)); fewer
    # ops matter on a GPU, where a DoRA step at the TinyLlama shape is bound by launching them
    t = torch.addmm(_w0_at(weight, a, A), Bf, a @ a.t(), beta=2.0 * scale, alpha=scale * scale)
    return (Bf * t).sum(1).add_(w0_sq).clamp_min_(0).sqrt_()


def _stacked(tensors: List[Tensor], dtype: torch.dtype) -> Tensor:
    """torch.stack(tensors) converted to ``dtype`` by the stack itself (one launch, not two)."""
    t = tensors[0]
    return torch.stack(tensors, out=torch.empty((len(tensors), *t.shape), dtype=dtype, device=t.device))


@torch.no_grad()
def weight_norms(weights: List[Tensor], As: List[Tensor], Bs: List[Tensor], us: List[Optional[Tensor]],
                 vs: List[Optional[Tensor]], scale: float, w0_sq: Tensor) -> Tensor:
    """``weight_norm`` of G modules of one shape at once: [G, N]. Every list has G entries of the
    same shapes and dtypes (u and v all given or all None); ``w0_sq`` [G, N] their ‖W0‖²_row.

    The same formula in batched products: 13 + 2G launches on a GPU instead of 11G (W0·Aᵀ stays
    one product per module: the W0s are separate tensors)."""
    acc = acc_dtype(weights[0].dtype)
    a = _stacked(As, acc)  # [G, r, K]
    Bf = _stacked(Bs, acc)  # [G, N, r]
    if vs[0] is not None:
        Bf = Bf * torch.stack(vs).to(acc)[:, :, None]
    if us[0] is not None:
        Bf = Bf * torch.stack(us).to(acc)[:, None, :]
    if _splits(weights[0], a, As[0]):  # the parts of every module's A at once: a few launches per shape
        parts = _split(a, weights[0].dtype).unbind(0)
        w0_at = _sum_parts(torch.stack([_mm_fp32(p, w) for w, p in zip(weights, parts)]), a.shape[1]).transpose(1, 2)
    else:
        w0_at = torch.stack([_w0_at(w, ai, Ai) for w, ai, Ai in zip(weights, a.unbind(0), As)])  # [G, N, r]
    t = torch.baddbmm(w0_at, Bf, a @ a.transpose(1, 2), beta=2.0 * scale, alpha=scale * scale)
    return (Bf * t).sum(2).add_(w0_sq).clamp_min_(0).sqrt_()


@torch.no_grad()
def norm_error_bound(weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor],
                     scale: float) -> Tensor:
    """The per-row bound on |‖W0 + ΔW‖² computed − exact| of ``weight_norm`` (module docstring)."""
    acc = acc_dtype(weight.dtype)
    unit = torch.finfo(acc).eps / 2
    gamma = (weight.shape[1] + A.shape[0] + 3) * unit
    delta = scale * (_folded_B(B.to(acc), None if u is None else u.to(acc), None if v is None else v.to(acc))
                     @ A.to(acc))
    return gamma * (row_norms_sq(weight).sqrt() + torch.linalg.vector_norm(delta, dim=1)) ** 2


def _norm_stamp(weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor], scale: float):
    return stamps.steps(), stamps.of(weight, A, B, u, v), scale


def _norm_fresh(cached, inputs: tuple) -> bool:
    """Whether a cached (stamp, norm) was computed from ``inputs`` (weight, A, B, u, v, scale) as they are."""
    if cached is None:
        return False
    step, stamp, scale = cached[0]
    return step == stamps.steps() and scale == inputs[5] and stamps.matches(stamp, inputs[:5])


def _gain_fresh(cached, norm: Tensor, m: Tensor, dtype: torch.dtype) -> bool:
    """Whether a cached g was formed from this very norm tensor (a recomputed norm is a new tensor), m
    as it is, and in ``dtype``."""
    if cached is None:
        return False
    n, stamp, dt = cached[0]
    return n is norm and dt == dtype and stamps.matches(stamp, (m,))


def _plain(*tensors: Optional[Tensor]) -> bool:
    """Plain local tensors: not an FSDP2 shard (DTensor, whole only inside its module's forward) nor a
    quantized parameter, which a batched norm must not read from outside its module."""
    return all(t is None or type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


def _signature(inputs: tuple) -> tuple:
    """What modules batched together share: the shapes, dtypes and device of (weight, A, B, u, v), and scale."""
    return tuple((t.shape, t.dtype, t.device) if t is not None else None for t in inputs[:5]) + inputs[5:]


def _alive(*tensors: Optional[Tensor]) -> bool:
    """Whether each tensor still has its storage. FSDP2 hands a module its unsharded parameters (plain
    tensors) in its forward and frees their storage afterwards: another module's last inputs may then
    be such a freed tensor, which only its own forward refills."""
    return all(t is None or t.numel() == 0 or t.untyped_storage().nbytes() > 0 for t in tensors)


class Magnitudes(nn.Module):
    """DoRA's trained magnitudes, one [N] vector per adapted module, and the norm cache.

    Held by the adapter state as ``state.dora`` when the model was patched with ``use_dora=True``:
    saved with the adapter, counted, trained like every other adapter parameter. The parameters are
    named ``lora_magnitude_vector.<slot>``, PEFT's name, because tools select DoRA's magnitudes by
    it: TRL's SFTTrainer casts a quantized model's trainable parameters to bf16 except those, whose
    small updates bf16 would round away."""

    def __init__(self, sizes: List[int], device=None, dtype=None):
        super().__init__()
        self.lora_magnitude_vector = nn.ParameterList(nn.Parameter(torch.ones(n, device=device, dtype=dtype)) for n in sizes)
        self._norms: Dict[int, Tuple[tuple, Tensor]] = {}
        self._gains: Dict[int, Tuple[tuple, Tensor]] = {}  # slot -> (key, g = m / norm in the dtype asked)
        self._w0: Dict[int, Tuple[tuple, Tensor]] = {}
        self.merged_norms: Dict[int, Tensor] = {}  # the norm each merged module was merged with (for unmerge)
        # Batched norms: each module registers how to read its current inputs (weakly), so that the
        # first module of a shape to find its norm stale refreshes every stale module of that shape
        # in one batched computation. Off for generated factors (new tensors each forward: patching
        # sets it), which would only be computed twice.
        self.batch_norms = True
        self._sources: Dict[int, Callable] = {}  # slot -> weak reference to its inputs' provider
        self._groups: Dict[tuple, Set[int]] = {}  # signature -> slots
        self._slot_group: Dict[int, tuple] = {}
        self._solo: Set[tuple] = set()  # groups whose other modules could not be read from outside

    def fresh_scope(self) -> Dict[str, Any]:
        """The caches a reference pass keeps apart (reference.py): the norms and gains of the values it
        runs; ‖W0‖² and the batching's bookkeeping are the same for both."""
        return {"_norms": {}, "_gains": {}}

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "lora_magnitude_vector":
            # the list itself, unregistered, for ``magnitude``'s lookup through its name -> parameter dict
            # (read there each time: torch.export swaps that dict, methods/tied.py says how)
            object.__setattr__(self, "_m_list", value)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        object.__setattr__(self, "_m_list", self.lora_magnitude_vector)

    @property
    def m(self) -> nn.ParameterList:
        """The magnitudes, m[slot] [N] (DoRA's m)."""
        return self.lora_magnitude_vector

    @torch.no_grad()
    def initialize(self, slot: int, weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor],
                   scale: float) -> None:
        """m = ‖W0 + ΔW‖_row, as PEFT's DoRA layer starts."""
        if self.m[slot].is_meta:
            return
        self.m[slot].copy_(weight_norm(weight, A, B, u, v, scale))

    def norm(self, slot: int, weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor],
             scale: float, dense=None, source: Optional[Callable[[], Optional[Callable[[], tuple]]]] = None,
             gain_dtype: Optional[torch.dtype] = None) -> Tensor:
        """‖W0 + ΔW‖_row of ``slot`` [N], detached, cached while W0 and the factors are unchanged.

        ``weight`` is the module's weight, which keys the cache; ``dense`` () -> W0 [N, K] when that
        weight is not W0 itself (a 4-bit layer's packed weight: dequantized only on a recompute).
        ``source``: a weak reference (``weakref.WeakMethod``) to a function giving the module's
        current (weight, A, B, u, v, scale), through which a stale same-shaped module refreshes this
        one's norm with its own (``_stale_alike``); held weakly, so no tensor outlives its module.
        ``gain_dtype``: a batched refresh also forms the refreshed modules' g in it (``gain``)."""
        if torch.compiler.is_compiling():
            return weight_norm(weight if dense is None else dense(), A, B, u, v, scale)
        inputs = (weight, A, B, u, v, scale)
        cached = self._norms.get(slot)
        if _norm_fresh(cached, inputs):
            return cached[1]
        key = _norm_stamp(*inputs)
        # under inference mode too, cache normal tensors: an inference tensor cached now could not be
        # saved for a later training step's backward
        with torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext():
            if dense is None and source is not None and self.batch_norms and _plain(weight, A, B, u, v):
                stale = self._stale_alike(slot, inputs, source)
                if len(stale) > 1:
                    self._refresh(stale, gain_dtype)
                    return self._norms[slot][1]
            w0, w0_sq = self._w0_sq(slot, weight, dense)
            w0 = w0 if w0 is not None else (weight.detach() if dense is None else dense())
            self._norms[slot] = (key, weight_norm(w0, A, B, u, v, scale, w0_sq))
        return self._norms[slot][1]

    def gain(self, slot: int, weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor], v: Optional[Tensor],
             scale: float, dtype: torch.dtype, dense=None,
             source: Optional[Callable[[], Optional[Callable[[], tuple]]]] = None) -> Tuple[Tensor, Tensor]:
        """(‖W0 + ΔW‖_row [N], g = m / that norm [N] in ``dtype``), both detached; arguments as ``norm``.

        g is the division in the norm's dtype (fp32 at least) rounded once to ``dtype``, and is cached
        while the norm, m (its version) and ``dtype`` are unchanged. A batched refresh of the norms
        (``norm``) forms every refreshed module's g in the same dtype with one division."""
        norm = self.norm(slot, weight, A, B, u, v, scale, dense, source, gain_dtype=dtype)
        m = self.m[slot]
        if torch.compiler.is_compiling():
            return norm, _ratio(m.detach(), norm, dtype)
        cached = self._gains.get(slot)
        if not _gain_fresh(cached, norm, m, dtype):
            with torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext():
                cached = self._gains[slot] = ((norm, stamps.of(m), dtype), _ratio(m.detach(), norm, dtype))
        return norm, cached[1]

    def magnitude(self, slot: int) -> nn.Parameter:
        """m[slot] [N] by one dict lookup: indexing the ParameterList goes through getattr, about 2 µs
        of host time a call, once per module and forward."""
        return self._m_list._parameters[str(slot)]

    def cached_gain(self, slot: int, m: Tensor, weight: Tensor, A: Tensor, B: Tensor, u: Optional[Tensor],
                    v: Optional[Tensor], scale: float, dtype: torch.dtype) -> Optional[Tuple[Tensor, Tensor]]:
        """``gain``'s (norm, g) when both are cached and current for these inputs (m = ``magnitude(slot)``),
        else None; computes nothing. Every forward of a training step but the first after an optimizer
        step ends here: two lookups and the stamps' checks, about 3 µs of host time, where building
        ``gain``'s provider and asking it cost about 16 µs a module."""
        got = self._gains.get(slot)
        if got is None:
            return None
        cached = self._norms.get(slot)
        if not _norm_fresh(cached, (weight, A, B, u, v, scale)) or not _gain_fresh(got, cached[1], m, dtype):
            return None
        return cached[1], got[1]

    def _w0_sq(self, slot: int, weight: Tensor, dense=None) -> Tuple[Optional[Tensor], Tensor]:
        """(W0 if it had to be read, ‖W0‖²_row): the row norms are cached per base weight."""
        have = self._w0.get(slot)
        # a frozen W0 changes only in place (a merge): its version says so; a trained one also by steps
        step = stamps.steps() if weight.requires_grad else None
        w0 = None
        if have is None or have[0][0] != step or not stamps.matches(have[0][1], (weight,)):
            w0 = weight.detach() if dense is None else dense()
            have = self._w0[slot] = ((step, stamps.of(weight)), row_norms_sq(w0))
        return w0, have[1]

    def _stale_alike(self, slot: int, inputs: tuple, source) -> List[Tuple[int, tuple]]:
        """[(slot, inputs)] first, then every module of the same group (shapes, dtypes, device, scale)
        whose current inputs are readable here and whose cached norm is stale. A group in which no
        other module was readable (FSDP2 per-block shards, offloaded blocks) stops being searched."""
        sig = _signature(inputs)
        if self._slot_group.get(slot) != sig:  # first call, or the module moved or changed dtype
            old = self._slot_group.pop(slot, None)
            if old is not None:
                self._groups[old].discard(slot)
            self._groups.setdefault(sig, set()).add(slot)
            self._slot_group[slot] = sig
        self._sources[slot] = source
        found = [(slot, inputs)]
        if sig in self._solo:
            return found
        readable = 0
        for other in self._groups[sig]:
            get = self._sources[other]() if other != slot else None
            theirs = get() if get is not None else None
            if theirs is None or not _plain(*theirs[:5]) or not _alive(*theirs[:5]) or _signature(theirs) != sig:
                continue
            readable += 1
            cached = self._norms.get(other)
            if not _norm_fresh(cached, theirs):
                found.append((other, theirs))
        if readable == 0 and len(self._groups[sig]) > 1:
            self._solo.add(sig)
        return found

    def _refresh(self, stale: List[Tuple[int, tuple]], gain_dtype: Optional[torch.dtype] = None) -> None:
        """Recompute the norms of ``stale`` ([(slot, inputs)] of one group), batched; with ``gain_dtype``,
        their g = m / norm too (one division for the group, when their m share a dtype and device)."""
        inputs = [inp for _, inp in stale]
        w0_sq = torch.stack([self._w0_sq(s, inp[0])[1] for s, inp in stale])
        norms = weight_norms([inp[0].detach() for inp in inputs], *([inp[i] for inp in inputs] for i in range(1, 5)),
                             inputs[0][5], w0_sq)
        rows = norms.unbind(0)  # one op for the G views, not G indexing ops
        for (s, inp), norm in zip(stale, rows):
            self._norms[s] = (_norm_stamp(*inp), norm)
        ms = [self.magnitude(s) for s, _ in stale]
        if gain_dtype is not None and len({(m.dtype, m.device) for m in ms}) == 1 and ms[0].device == norms.device:
            gains = _ratio(torch.stack([m.detach() for m in ms]), norms, gain_dtype)
            for (s, _), m, norm, g in zip(stale, ms, rows, gains.unbind(0)):
                self._gains[s] = ((norm, stamps.of(m), gain_dtype), g)

    @torch.no_grad()
    def merged_weight(self, slot: int, weight: Tensor, delta: Tensor, norm: Tensor) -> Tensor:
        """g⊙(W0 + ΔW) [N, K], g = m/norm (Liu et al. 2024, eq. 5), in ``acc_dtype`` of W0's dtype (fp32
        for a half-precision W0: PEFT's merge precision, rounded once by whoever stores it). ``norm``
        is the forward's (``norm``), so a merged model computes what the adapted one did."""
        acc = acc_dtype(weight.dtype)
        g = self.m[slot].detach().to(norm.dtype) / norm
        return (weight.to(acc) + delta.to(acc)) * g.to(acc)[:, None]

    @torch.no_grad()
    def merge(self, slot: int, weight: Tensor, delta: Tensor, norm: Tensor) -> None:
        """W0 ← ``merged_weight`` (Linear layout [N, K], in place); keeps the norm for unmerge."""
        weight.copy_(self.merged_weight(slot, weight, delta, norm))
        self.merged_norms[slot] = norm.clone()

    @torch.no_grad()
    def unmerge(self, slot: int, weight: Tensor, delta: Tensor) -> None:
        """W0 ← W/g − ΔW with the norm the merge used: exact to rounding (one rounding, as ``merge``)."""
        norm = self.merged_norms.pop(slot)
        acc = acc_dtype(weight.dtype)
        g = self.m[slot].detach().to(norm.dtype) / norm
        weight.copy_(weight.to(acc) / g.to(acc)[:, None] - delta.to(acc))

    def __getstate__(self):  # a copy recomputes its norms: cached tensors belong to the original's storage
        return {**self.__dict__, "_norms": {}, "_gains": {}, "_w0": {}, "_sources": {}, "_groups": {},
                "_slot_group": {}, "_solo": set()}


__all__ = ["Magnitudes", "weight_norm", "weight_norms", "norm_error_bound", "row_norms_sq"]
