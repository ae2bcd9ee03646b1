"""lora, tied_lora and vera: Tied-LoRA's general adapter with factors that are parameters.

Tied-LoRA Table 1 as data: a configuration is which of A, B are tied (one tensor shared
by every adapted module), which of A, B, u, v are trained, and whether the layer's
targets share one down-projection (the joint-QKV form). Its eight rows are:

    row  tie   train  joint params (L layers, hidden d, rank r)  initialisation
    1    -     AB     4Ldr             A ~ N, B = 0, u = v = 1       (LoRA)
    2    AB    AB     4dr              A ~ N, B = 0, u = v = 1
    3    AB    ABuv   4dr + L(r+3d)    A, B ~ N, u = 1, v = 0
    4    AB    Bu     (L+3d)r          A, B ~ N, u = v = 1
    5    AB    B      3dr              A, B ~ N, u = v = 1
    6    AB    Auv    dr + L(r+3d)     A, B ~ N, u = 1, v = 0
    7    AB    A      dr               A, B ~ N, u = v = 1
    8    AB    uv     L(r+3d)          A, B ~ N, u = 1, v = 0        (VeRA)

One rule reproduces every row: v = 0 whenever v is trained (so the model starts at its
base output); otherwise B = 0 when B is trained together with A, or when A is a
per-module factor (LoRA, and LEFT's A_F B_L); otherwise A and B are both random.
"N" is Xavier-normal. Frozen u and v are the identity and cost nothing at run time.

Tied factors of different shapes (GQA: k/v are narrower than q) are stored once at the
largest shape and each module takes its leading slice, as PEFT's VeRA does. In the
joint form a layer's targets are one group: one A (and u) serves them all, and their
up-projections are stacked into one B (and v), of which each target reads its rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import checks
from ..factors import AdapterState, Factors, JointGroup, Plan, register_optional
from .registry import Method, rates, register

Tensor = torch.Tensor


def _letters(value: str, valid: str, option: str) -> frozenset:
    if not isinstance(value, str):
        raise TypeError(f"{option} must be a string of letters from {valid!r}, got {value!r}")
    bad = sorted(set(value) - set(valid))
    if bad or len(set(value)) != len(value):
        raise ValueError(f"{option}={value!r} is not valid: use each of the letters {', '.join(valid)} at most once "
                         f"(e.g. {option}={valid!r})")
    return frozenset(value)


@dataclass(frozen=True)
class Config:
    """A resolved Table 1 configuration (what the state is built from)."""

    tie: frozenset
    train: frozenset
    joint: bool
    init: str  # "lora" (PEFT's), "table1" (Tied-LoRA's) or "vera" (PEFT's VeRA)
    d_initial: float = 0.1
    prng_key: int = 0


# --- options of the three methods ------------------------------------------------------------


def _one_a_per_layer(joint: bool, plan: Plan) -> None:
    """joint=True shares one down-projection per layer (joint QKV); DoRA's norm needs one per module."""
    if checks.boolean("joint", joint) and plan.use_dora:
        raise ValueError("use_dora needs one down-projection per module, but joint=True shares one per layer; "
                         "use one or the other")


@dataclass(frozen=True)
class LoraOptions:
    train: str = "AB"  # "B" gives LEFT's A_F B_L: A frozen random, B trained
    joint: bool = False

    def validate(self, plan: Plan) -> None:
        _one_a_per_layer(self.joint, plan)
        if self.joint and (plan.rank_pattern or plan.alpha_pattern):
            raise ValueError("rank_pattern / alpha_pattern need one A per module, but joint=True shares one A "
                             "per layer; use one or the other")

    def config(self) -> Config:
        train = _letters(self.train, "AB", "train")
        if "B" not in train:
            raise ValueError("lora with B frozen at its zero init never changes the model; train='AB' or 'B' "
                             "(use tied_lora for a frozen random B)")
        return Config(frozenset(), train, checks.boolean("joint", self.joint), "lora")


@dataclass(frozen=True)
class TiedLoraOptions:
    tie: str = "AB"  # which of A, B are shared by every adapted module
    train: str = "ABuv"  # which of A, B, u, v are trained; default: the paper's recommended row 3
    joint: bool = False  # one down-projection per layer for all its targets (joint QKV)

    def validate(self, plan: Plan) -> None:
        _one_a_per_layer(self.joint, plan)

    def config(self) -> Config:
        train = _letters(self.train, "ABuv", "train")
        if not train:
            raise ValueError("train='' trains nothing; choose letters from 'ABuv'")
        return Config(_letters(self.tie, "AB", "tie"), train, checks.boolean("joint", self.joint), "table1")


@dataclass(frozen=True)
class VeraOptions:
    d_initial: float = 0.1  # initial value of u (VeRA's d), as in the VeRA paper and PEFT
    projection_prng_key: int = 0  # seed of the frozen shared A and B (PEFT's name and default)

    def config(self) -> Config:
        d = checks.real("d_initial", self.d_initial, float("-inf"), float("inf"), low_open=True, high_open=True)
        if d == 0:  # b starts at 0 too (PEFT's VeRA): every gradient of the adapter would be 0 for ever
            raise ValueError("d_initial=0 never trains: VeRA's b starts at 0, so both scaling vectors get zero "
                             "gradients; use a nonzero value (0.1, the paper's and PEFT's default)")
        key = checks.integer("projection_prng_key", self.projection_prng_key, 0)
        return Config(frozenset("AB"), frozenset("uv"), False, "vera", d, key)


# --- the state -------------------------------------------------------------------------------


class _Group(nn.Module):
    """Per-group (per-module, or per-layer in the joint form) factors that are not tied."""


class TiedState(AdapterState):
    def __init__(self, plan: Plan, config: Config):
        super().__init__(plan)
        self.config = config
        r = plan.rank
        self._group_of, self._rows, members, group_k, group_n = _layout(plan, config.joint)
        self._joint = [JointGroup(len(m)) for m in members] if config.joint else None
        tied_a = "A" in config.tie
        tied_b = "B" in config.tie
        init = _Init(config)

        self.A = self.B = None
        if tied_a:
            self.A = nn.Parameter(init.A(plan, r, max(group_k)), requires_grad="A" in config.train)
        if tied_b:
            self.B = nn.Parameter(init.B(plan, max(group_n), r), requires_grad="B" in config.train)
        self.groups = nn.ModuleList()
        for k, n, member in zip(group_k, group_n, members):
            rg = plan.slot_rank(plan.slots[member[0]])  # per-module ranks exist only without tying or joint groups
            g = _Group()
            register_optional(g, "A", None if tied_a else init.A(plan, rg, k), "A" in config.train)
            register_optional(g, "B", None if tied_b else init.B(plan, n, rg), "B" in config.train)
            register_optional(g, "u", init.u(plan, rg) if "u" in config.train else None, True)
            register_optional(g, "v", init.v(plan, n) if "v" in config.train else None, True)
            self.groups.append(g)
        self._scales = [plan.slot_scale(s) for s in plan.slots]
        self._group_modules = list(self.groups)  # factors' lookups (a plain list: not registered twice)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._group_modules = list(self.groups)  # a pickle from before they were kept

    def factors(self, slot: int) -> Factors:
        # Called by every adapted module's forward: read through the modules' own name -> parameter
        # dicts (which a replaced parameter, FSDP2's sharding or a move update in place), not through
        # nn.Module attribute lookups, about 0.4 µs of host time each. Each dict is read from its module
        # now, never kept: torch.export (non-strict) swaps a module's dict for one of fake tensors and
        # puts a new one back, so a kept dict would serve the fakes after an export. A parametrized
        # factor (torch.nn.utils.parametrize) leaves those dicts: then attributes are read, as before.
        gi = self._group_of[slot]
        got = self._factors(slot, gi, self._group_modules[gi]._parameters, self._parameters)
        if got is None:
            g = self.groups[gi]
            got = self._factors(slot, gi, {n: getattr(g, n) for n in "ABuv"},
                                {n: getattr(self, n) for n in "AB" if getattr(self, n, None) is not None})
        return got

    def _factors(self, slot: int, gi: int, g, own) -> Optional[Factors]:
        """The factors from name -> tensor maps of the slot's group (``g``) and of the tied ones (``own``);
        None when one is missing from them (a parametrized factor is not in its module's dict)."""
        try:
            gA, gB, u, v = g["A"], g["B"], g["u"], g["v"]
        except KeyError:
            return None
        lo, hi = self._rows[slot]
        k = self.plan.slots[slot].in_features
        A, B = own.get("A"), own.get("B")
        A = gA if A is None else (A if A.shape[1] == k else A[:, :k])
        if B is None:
            B = gB
        if A is None or B is None:
            return None
        if B.shape[0] != hi - lo:
            B = B[lo:hi]
        if v is not None and v.shape[0] != hi - lo:
            v = v[lo:hi]
        return Factors(A, B, u, v, self._scales[slot], None if self._joint is None else self._joint[gi])

    def describe_slot(self, slot: int) -> Dict[str, str]:
        c = self.config
        where = "per layer (joint)" if c.joint else "per module"

        def what(x: str) -> str:
            if x in "AB" and x in c.tie:
                return f"tied, {'trained' if x in c.train else 'frozen'}"
            if x in "uv" and x not in c.train:
                return "1 (identity)"
            return f"{where}, {'trained' if x in c.train else 'frozen'}"

        return {x: what(x) for x in "ABuv"}

    def extra_config(self):
        return {"table1": {"tie": "".join(sorted(self.config.tie)), "train": "".join(
            x for x in "ABuv" if x in self.config.train), "joint": self.config.joint}}


def _layout(plan: Plan, joint: bool):
    """Groups of slots sharing a down-projection, and each slot's rows in its group's B."""
    if not joint:
        group_of = [s.index for s in plan.slots]
        rows = [(0, s.out_features) for s in plan.slots]
        return group_of, rows, [[s.index] for s in plan.slots], [s.in_features for s in plan.slots], \
            [s.out_features for s in plan.slots]
    by_layer: Dict[int, List[int]] = {}
    for s in plan.slots:
        if s.layer is None:
            raise ValueError(f"joint=True needs every target inside the model's repeated blocks; {s.path} is not "
                             "(an encoder-decoder model's two stacks of blocks are not indexed: joint=False there)")
        by_layer.setdefault(s.layer, []).append(s.index)
    group_of, rows = [0] * len(plan.slots), [(0, 0)] * len(plan.slots)
    members, group_k, group_n = [], [], []
    for gi, (layer, idx) in enumerate(sorted(by_layer.items())):
        ks = {plan.slots[i].in_features for i in idx}
        if len(ks) != 1:
            sizes = ", ".join(f"{plan.slots[i].name} {plan.slots[i].in_features}" for i in idx)
            raise ValueError(f"joint=True needs the targets of layer {layer} to share their input size (one "
                             f"down-projection per layer, Tied-LoRA's joint QKV); got {sizes}: choose targets with "
                             f"one input size, e.g. q_proj, k_proj, v_proj")
        off = 0
        for i in idx:
            n = plan.slots[i].out_features
            group_of[i], rows[i] = gi, (off, off + n)
            off += n
        members.append(idx)
        group_k.append(ks.pop())
        group_n.append(off)
    return group_of, rows, members, group_k, group_n


class _Init:
    """Initial values of each factor for a configuration (see the module docstring)."""

    def __init__(self, c: Config):
        self.c = c
        self._gen: Optional[torch.Generator] = None
        if c.init == "vera":
            self._gen = torch.Generator(device="cpu").manual_seed(c.prng_key)

    def _b_is_zero(self) -> bool:
        c = self.c
        if c.init == "lora":
            return True
        return "B" in c.train and "v" not in c.train and ("A" in c.train or "A" not in c.tie)

    def A(self, plan: Plan, r: int, k: int) -> Tensor:
        t = plan.new_tensor(r, k)
        if self.c.init == "lora":
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # PEFT's LoRA default
        elif self.c.init == "vera":
            _vera_kaiming(t, self._gen)
        else:
            nn.init.xavier_normal_(t)
        return t

    def B(self, plan: Plan, n: int, r: int) -> Tensor:
        t = plan.new_tensor(n, r)
        if self._b_is_zero():
            nn.init.zeros_(t)
        elif self.c.init == "vera":
            _vera_kaiming(t, self._gen)
        else:
            nn.init.xavier_normal_(t)
        return t

    def u(self, plan: Plan, r: int) -> Tensor:
        return nn.init.constant_(plan.new_tensor(r), self.c.d_initial if self.c.init == "vera" else 1.0)

    def v(self, plan: Plan, n: int) -> Tensor:
        return nn.init.zeros_(plan.new_tensor(n))


def _vera_kaiming(t: Tensor, gen: torch.Generator) -> None:
    """PEFT VeRA's seeded Kaiming-uniform (gain √2, fan_in), drawn on the CPU so that the
    same ``projection_prng_key`` gives the same A and B as PEFT on any device."""
    if t.is_meta:
        return
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(t.shape[1])
    with torch.no_grad():
        t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=gen))


def _builder(plan: Plan) -> TiedState:
    return TiedState(plan, plan.options.config())


register(Method("lora", "LoRA: per-module A (Kaiming) and B (zero), both trained", LoraOptions, _builder,
                default_alpha=lambda r: 8.0, paper="Hu et al. 2021; PEFT defaults", per_module_rank=True,
                dora=True, lr=rates("lora", 5e-5, "LEFT Table 6, the paper's LoRA baseline")))
register(Method("tied_lora", "Tied-LoRA: A/B tied across layers, any of A, B, u, v trained (Table 1)",
                TiedLoraOptions, _builder, default_alpha=lambda r: float(r), paper="Tied-LoRA eq. (1), Table 1",
                dora=True, lr=rates("tied_lora", 1e-4, "Tied-LoRA §4, its higher rate")))
register(Method("vera", "VeRA: frozen shared random A, B from a seed; u, v trained", VeraOptions, _builder,
                default_alpha=lambda r: float(r), paper="VeRA; Tied-LoRA Table 1 row 8",
                dora=True, lr=rates("vera", 1e-4, "Tied-LoRA §4 (VeRA is its Table 1 row 8)")))
