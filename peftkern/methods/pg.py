"""pg_fixed, pg_trainable, pg_pos: LEFT's Parameter Generation (LEFT §2, Table 1, Appendix D).

A small hypernetwork γ (peftkern.hypernets.generator) generates the adapter factors of
every layer from per-layer embeddings, so the layers share what they learn:

    method        layer embedding e^l (h1 = embed_dim)          γ input
    pg_fixed      N(0, 1), frozen                                e^l
    pg_trainable  N(0, 1) at init, trained                       e^l
    pg_pos        N(0, 1) at init, trained                       [e^l, p^l], p^l of eq. (2), fixed

``generate`` picks what γ makes: "A" (A_H B_L), "B" (A_L B_H) or "AB" (A_H B_H, one
hypernetwork for A and one for B, each with its own Linear1 and embeddings). ``other``
says what the factor that is not generated is: "trained" per layer (L) or "frozen"
random (F, e.g. A_F B_H). One hypernetwork serves all targets of a layer: its row for a
layer holds, back to back, every target's A (r·K_t values each) or B (N_t·r values), in
the order the targets appear in the block. ``layers_per_hypernet`` splits the layers into
consecutive groups with a hypernetwork (and embeddings) each.

Trainable parameters, per hypernetwork of a group of L_g layers with row size P:
(h_in·h2 + h2) + (h2·P + P), plus L_g·h1 when the embeddings are trained (h_in = h1, or
2·h1 for pg_pos, whose positional half is fixed and not counted); plus every per-layer
trained factor. This reproduces LEFT Tables 2, 3, 4 and 13 on TinyLlama exactly, except
for the grouped rows of Table 3: the paper's numbers equal
G·(hypernet + L·h1) + per-layer factors, i.e. each of the G hypernetworks carries a full
L×h1 embedding table; here each group has only its own layers' embeddings, which is
(G−1)·L·h1 fewer.

Initialisation (Appendix D, and the choices it leaves open): every γ Linear starts from
nn.Linear's Kaiming-uniform default, and the final Linear of a γ that generates a
non-zero factor is rescaled so that the factor starts at the standard deviation of the
LoRA factor it replaces, 1/√(3·fan_in) (LayerGenerator._match_std: at nn.Linear's scale a
generated A is ~6× LoRA's and PG diverges at LoRA's learning rates); per-layer trained
factors are LoRA's (A Kaiming, B zero); frozen factors are Kaiming-uniform random. The
parameter counts are LEFT's exactly: only initial values change. Exactly one side starts at zero, so
the model starts at its base output as with LoRA: B (a per-layer zero B, or a zeroed
final Linear of the B-hypernetwork, in A_H B_H too: with both hypernetworks at Kaiming,
ΔW starts as random noise of std ≈ 0.24 at r = 8, h1 = h2 = 20, K = N = 2048), except
with a frozen random B (A_H B_F), where the A-hypernetwork's final Linear is zeroed.

Generation runs once per forward pass, lazily, in the first ``factors()`` call: one
dispatched ``hypernet`` op per hypernetwork, its [L_g, P] output unpacked into per-slot
views. ``PassCache`` (hypernets.pass_cache) documents when rows are reused: eval caching,
gradient checkpointing (reentrant too), merge outside a forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import checks
from ..factors import AdapterState, Factors, Plan
from ..hypernets.generator import LayerGenerator, group_layers, hypernet_op, row_size, unpack_rows
from ..hypernets.pass_cache import PassCache
from .registry import Method, rates, register

Tensor = torch.Tensor


@dataclass(frozen=True)
class Embeddings:
    trained: bool
    positional: bool


# LEFT §2.2: the three methods differ only in their layer embeddings.
EMBEDDINGS: Dict[str, Embeddings] = {
    "pg_fixed": Embeddings(trained=False, positional=False),
    "pg_trainable": Embeddings(trained=True, positional=False),
    "pg_pos": Embeddings(trained=True, positional=True),
}
GENERATE: Dict[str, Tuple[str, ...]] = {"A": ("A",), "B": ("B",), "AB": ("A", "B")}
OTHER = ("trained", "frozen")


@dataclass(frozen=True)
class PGOptions:
    generate: str = "A"  # "A": A_H B_L, "B": A_L B_H, "AB": A_H B_H
    other: str = "trained"  # the non-generated factor: "trained" per layer (L) or "frozen" random (F)
    embed_dim: int = 20  # h1 (and h_p for pg_pos)
    hidden_dim: int = 20  # h2
    layers_per_hypernet: Optional[int] = None  # None: one hypernetwork for all layers

    def __post_init__(self):
        checks.choice("generate", self.generate, tuple(GENERATE))
        checks.choice("other", self.other, OTHER)
        if self.generate == "AB" and self.other == "frozen":
            raise ValueError("other='frozen' needs a factor that is not generated, but generate='AB' generates "
                             "both A and B; use generate='A' or 'B' with other='frozen', or other='trained'")
        checks.integer("embed_dim", self.embed_dim)
        checks.integer("hidden_dim", self.hidden_dim)
        checks.integer("layers_per_hypernet", self.layers_per_hypernet, allow_none=True)

    def validate(self, plan: Plan) -> None:
        if EMBEDDINGS[plan.method].positional and self.embed_dim % 2:
            raise ValueError(f"{plan.method} needs an even embed_dim (its positional embedding of eq. (2) is "
                             f"embed_dim/2 sine-cosine pairs), got {self.embed_dim}")
        layout = Layout(plan)
        group_layers(layout.layers, self.layers_per_hypernet)


class Layout:
    """Which slot is which target of which layer. Every layer must have the same targets
    (names and shapes, in the same order), because one row layout serves all of them."""

    def __init__(self, plan: Plan):
        by_layer: Dict[int, List[int]] = {}
        for s in plan.slots:
            if s.layer is None:
                raise ValueError(f"PG generates factors per repeated block (layer), but target {s.path} is outside "
                                 "the model's blocks; choose targets inside them (e.g. q_proj, v_proj). An "
                                 "encoder-decoder model (T5, BART, Whisper) has two stacks of blocks, which PG does "
                                 "not index: use another method there")
            by_layer.setdefault(s.layer, []).append(s.index)
        self.layers: List[int] = sorted(by_layer)
        self.slots_of: Dict[int, List[int]] = {layer: by_layer[layer] for layer in self.layers}

        def signature(layer: int) -> List[Tuple[str, int, int]]:
            return [(plan.slots[i].name, plan.slots[i].in_features, plan.slots[i].out_features)
                    for i in self.slots_of[layer]]

        first = self.layers[0]
        self.targets = signature(first)  # (name, K, N) per target, the same in every layer
        for layer in self.layers[1:]:
            if signature(layer) != self.targets:
                raise ValueError(f"PG needs the same targets in every layer, but layer {first} has "
                                 f"{self.targets} and layer {layer} has {signature(layer)} (name, in, out)")

    def shapes(self, factor: str, rank: int) -> List[Tuple[int, int]]:
        """Shapes of one layer's factors, target by target: A is [r, K], B is [N, r]."""
        return [(rank, k) if factor == "A" else (n, rank) for _, k, n in self.targets]


@dataclass(frozen=True)
class Generated:
    """Where a slot's generated factor is: ``hypernets[group][factor]``'s output row ``row``,
    elements ``offset`` to ``offset + prod(shape)``."""

    group: int
    factor: str
    row: int
    offset: int
    shape: Tuple[int, int]


class PGState(AdapterState):
    def __init__(self, plan: Plan):
        super().__init__(plan)
        opts: PGOptions = plan.options
        emb = EMBEDDINGS[plan.method]
        self.layout = layout = Layout(plan)
        self.generated: Tuple[str, ...] = GENERATE[opts.generate]
        self.groups = group_layers(layout.layers, opts.layers_per_hypernet)
        # The side that starts at zero, so the model starts at its base output (module docstring)
        zero = "A" if opts.other == "frozen" and opts.generate == "A" else "B"
        r, kw = plan.rank, dict(device=plan.device, dtype=plan.dtype)
        self._shapes = {f: layout.shapes(f, r) for f in self.generated}

        self.hypernets = nn.ModuleList(
            nn.ModuleDict({f: LayerGenerator(group, row_size(self._shapes[f]), opts.embed_dim, opts.hidden_dim,
                                             train_embeddings=emb.trained, positional=emb.positional,
                                             zero_output=(f == zero), init_std=_lora_std(self._shapes[f]), **kw)
                           for f in self.generated})
            for group in self.groups)

        # The factor that is not generated: one parameter per slot, in slot order.
        self.A: Optional[nn.ParameterList] = None
        self.B: Optional[nn.ParameterList] = None
        self.per_layer: Optional[str] = {("A",): "B", ("B",): "A"}.get(self.generated)
        if self.per_layer is not None:
            trained = opts.other == "trained"
            tensors = [_init_factor(plan, s.in_features, s.out_features, self.per_layer, zero=self.per_layer == zero)
                       for s in plan.slots]
            setattr(self, self.per_layer, nn.ParameterList([nn.Parameter(t, requires_grad=trained) for t in tensors]))

        # slot -> factor -> where its generated tensor lies (for explain() and tests)
        self.sources: List[Dict[str, Generated]] = [dict() for _ in plan.slots]
        for gi, group in enumerate(self.groups):
            for row, layer in enumerate(group):
                for t, slot in enumerate(layout.slots_of[layer]):
                    for f in self.generated:
                        offset = row_size(self._shapes[f][:t])
                        self.sources[slot][f] = Generated(gi, f, row, offset, self._shapes[f][t])
        self._pass = PassCache()  # the generated rows of the current forward pass

    # --- the hot path ------------------------------------------------------------------
    def factors(self, slot: int) -> Factors:
        rows = self._current_rows()
        A = rows["A"][slot] if "A" in rows else self.A[slot]
        B = rows["B"][slot] if "B" in rows else self.B[slot]
        return Factors(A, B, None, None, self.plan.scale)

    def _current_rows(self) -> Dict[str, List[Tensor]]:
        return self._pass.get(self.training, self._generate, self._watched)

    def _watched(self) -> List[Tensor]:
        return [t for gens in self.hypernets for g in gens.values() for t in g.watched()]

    def _generate(self) -> Dict[str, List[Tensor]]:
        """One hypernet op per hypernetwork, on the adapter's backend; every slot gets a view of its row."""
        device_type = self.hypernets[0][self.generated[0]].linear2.weight.device.type
        return self._run(hypernet_op(self.backends.get(device_type)))

    def _run(self, hypernet_op) -> Dict[str, List[Tensor]]:
        out: Dict[str, List[Tensor]] = {f: [None] * len(self.plan.slots) for f in self.generated}
        for gi, group in enumerate(self.groups):
            for f, gen in self.hypernets[gi].items():
                per_layer = unpack_rows(gen(hypernet_op), self._shapes[f])
                for row, layer in enumerate(group):
                    for slot, tensor in zip(self.layout.slots_of[layer], per_layer[row]):
                        out[f][slot] = tensor
        return out

    def invalidate(self) -> None:
        """Forget the generated rows (needed only after in-place changes through ``.data``)."""
        self._pass.invalidate()

    # --- integration points ---------------------------------------------------------------
    def attach(self, model: nn.Module) -> List[Any]:
        return self._pass.attach(model)

    def pass_caches(self) -> List[Any]:
        return [*super().pass_caches(), self._pass]

    def generators(self) -> List[nn.Module]:
        return [gen for gens in self.hypernets for gen in gens.values()]

    def describe_slot(self, slot: int) -> Dict[str, str]:
        def what(f: str) -> str:
            src = self.sources[slot].get(f)
            if src is not None:
                return f"generated (hypernets.{src.group}.{f}, row {src.row})"
            return "per layer, trained" if self.plan.options.other == "trained" else "per layer, frozen random"

        return {"A": what("A"), "B": what("B"), "u": "1 (identity)", "v": "1 (identity)"}

    def extra_config(self) -> Dict[str, Any]:
        return {"pg": {"hypernet_layers": self.groups, "targets": [t[0] for t in self.layout.targets]}}


def _lora_std(shapes: List[Tuple[int, int]]) -> List[Tuple[int, float]]:
    """(numel, std) per target of a generated row: the std of PEFT's Kaiming-uniform init
    (a = √5, bound 1/√fan_in, std = bound/√3) of the factor of that shape, fan_in = its columns."""
    return [(r * c, 1.0 / math.sqrt(3.0 * c)) for r, c in shapes]


def _init_factor(plan: Plan, k: int, n: int, factor: str, zero: bool) -> Tensor:
    """A per-layer factor: zero, or Kaiming-uniform as PEFT's LoRA A (bound 1/√fan_in)."""
    t = plan.new_tensor(plan.rank, k) if factor == "A" else plan.new_tensor(n, plan.rank)
    return nn.init.zeros_(t) if zero else nn.init.kaiming_uniform_(t, a=math.sqrt(5))


_PAPER = "LEFT §2.2, Table 1, Appendix D"
for _name, _summary in (
        ("pg_fixed", "LEFT PG-Fixed: a hypernetwork generates A and/or B from frozen N(0,1) layer embeddings"),
        ("pg_trainable", "LEFT PG-Trainable: a hypernetwork generates A and/or B from trained layer embeddings"),
        ("pg_pos", "LEFT PG-Pos: trained layer embeddings + fixed sinusoidal layer positions feed the hypernetwork")):
    # alpha 16 at every rank, as LEFT Table 6
    register(Method(_name, _summary, PGOptions, PGState, default_alpha=lambda r: 16.0, paper=_PAPER,
                    dora=True, lr=rates(_name, 5e-5, "LEFT Table 6")))
