"""LEFT's parameter generator γ: layer embeddings -> one row of adapter factors per layer.

γ is Linear(h_in -> h2) -> exact GeLU -> Linear(h2 -> P), both with biases (LEFT §2.1 and
Appendix D). Its input for layer l is the layer embedding e^l (h1 values, N(0, 1) at init,
frozen or trained), optionally concatenated with the fixed sinusoidal position p^l of
eq. (2), so h_in = h1 or 2·h1. A ``LayerGenerator`` owns γ and the embeddings of the
layers it serves, and produces the rows of *all* of them with one call of the dispatched
``hypernet`` op, ``op(E, W1, b1, W2, b2) -> [L_g, P]``, which a backend may run as one
kernel.

The pieces are method-agnostic and meant to be reused (HyperAdaLoRA's MLP hypernetworks
have the same "embeddings of a group of layers -> one batched call -> per-layer views"
shape):

    hypernet_op(backend)              the dispatched op, one call for all layers
    group_layers(layers, per_group)   consecutive groups of layers, one hypernetwork each
    sinusoidal_positions(layers, h)   eq. (2)
    LayerGenerator                    embeddings + γ, one batched call
    unpack_rows(rows, shapes)         [L_g, P] -> per layer, per target views (no copies)

Generating once per forward pass (and reusing under eval, gradient checkpointing and merge)
is ``hypernets.pass_cache.PassCache``'s job, for every generating method.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import functions
from ..ops.backend import Backend

Tensor = torch.Tensor
HypernetOp = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def hypernet_op(backend: Backend) -> HypernetOp:
    """The ``hypernet`` op on ``backend``'s kernels (one call for all layers)."""
    return functools.partial(functions.hypernet, backend=backend)


def group_layers(layers: Sequence[int], per_group: Optional[int]) -> List[List[int]]:
    """Split ``layers`` into consecutive groups of ``per_group`` (None: one group of all).

    Raises ValueError, listing the valid sizes, when ``per_group`` does not divide the
    number of layers: unequal groups would give their hypernetworks different input
    statistics and are not what LEFT Table 3 evaluates.
    """
    layers = list(layers)
    if per_group is None:
        return [layers]
    n = len(layers)
    if n % per_group:
        valid = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        raise ValueError(f"layers_per_hypernet={per_group} does not divide the {n} adapted layers; "
                         f"valid values: {valid}, or None for one hypernetwork over all layers")
    return [layers[i:i + per_group] for i in range(0, n, per_group)]


def sinusoidal_positions(layers: Sequence[int], dim: int) -> Tensor:
    """LEFT eq. (2): p^l = [sin(w_i·l), cos(w_i·l)] for i = 1..dim/2, w_i = 1/10000^(2i/dim).

    Indexing, as the paper writes it: l runs over [L] = 1..L, so the model's block b
    (0-based, ``Slot.layer``) has l = b + 1, and i starts at 1 (Vaswani et al. start
    both at 0, which would make the first layer's embedding a constant 0/1 pattern).
    Each (sin, cos) pair is interleaved, as in Vaswani et al. Positions are the blocks'
    indices in the whole model, so grouping layers never changes a layer's position.
    Computed in float64 on the CPU: the same values on every device and dtype.
    Returns a [len(layers), dim] float64 CPU tensor.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"the positional embedding size must be a positive even number, got {dim}")
    pos = torch.tensor([b + 1 for b in layers], dtype=torch.float64)[:, None]
    i = torch.arange(1, dim // 2 + 1, dtype=torch.float64)
    angles = pos * torch.pow(10000.0, -2.0 * i / dim)  # [L, dim/2]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).reshape(len(layers), dim)


class LayerGenerator(nn.Module):
    """γ and the embeddings of one group of layers: ``forward(op)`` -> [L_g, out_features].

    Parameters (what LEFT Table 1 counts): ``embed`` [L_g, h1] (trained or frozen), and
    ``linear1`` (h_in·h2 + h2) and ``linear2`` (h2·P + P). The positional half of the
    input is a non-persistent buffer: fixed, recomputable, and neither counted nor saved.

    The generated rows are ``out_scale · γ(E)``, with ``out_scale`` a fixed scalar (a
    persistent buffer, not a parameter) set at init so that one Adam step on γ's final
    Linear moves a generated entry about as far as one Adam step moves the LoRA factor
    entry it replaces, i.e. by about the learning rate. Why: Adam moves every weight of
    the final Linear by ~lr, with signs that follow its input h = GeLU(W1·e + b1), so an
    output entry moves by ~lr·(‖h‖₁ + 1): about 7× lr for h2 = 20. Generated factors then
    move several times faster than LoRA's and PG diverges at the learning rates where
    LoRA trains (the README's accuracy tables before this rule). out_scale = 1/(‖h‖₁ + 1),
    averaged over the group's layers at init. HyperAdaLoRA's state-update networks use the
    same kind of output scale (1/h, state_update.py).

    Initialisation: both Linears start from nn.Linear's default, Kaiming-uniform weights
    (a = √5) and uniform biases, as LEFT Appendix D says; ``zero_output`` zeroes the final
    Linear (weight and bias) so that the generated factor starts at exactly 0, and
    ``init_std`` rescales its rows so that each generated factor, out_scale included,
    starts at the standard deviation of the LoRA factor it replaces (Kaiming's 1/√(3K)
    for an A; nn.Linear's scale would be ~6× that).
    """

    def __init__(self, layers: Sequence[int], out_features: int, embed_dim: int, hidden_dim: int, *,
                 train_embeddings: bool, positional: bool, zero_output: bool,
                 init_std: Optional[Sequence[Tuple[int, float]]] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.layers = list(layers)
        kw = dict(device=device, dtype=dtype or torch.get_default_dtype())
        self.embed = nn.Parameter(torch.randn(len(self.layers), embed_dim, **kw), requires_grad=train_embeddings)
        positions = sinusoidal_positions(self.layers, embed_dim).to(**kw) if positional else None
        self.register_buffer("positions", positions, persistent=False)
        h_in = 2 * embed_dim if positional else embed_dim
        self.linear1 = nn.Linear(h_in, hidden_dim, **kw)
        self.linear2 = nn.Linear(hidden_dim, out_features, **kw)
        self.register_buffer("out_scale", torch.ones((), **kw))
        with torch.no_grad():
            if not self.out_scale.is_meta:
                hidden = F.gelu(F.linear(self.inputs(), self.linear1.weight, self.linear1.bias))
                self.out_scale.fill_(1.0 / float(hidden.abs().sum(1).mean() + 1.0))
        if zero_output:
            nn.init.zeros_(self.linear2.weight)
            nn.init.zeros_(self.linear2.bias)
        elif init_std is not None:
            self._match_std(init_std)

    @torch.no_grad()
    def _match_std(self, segments: Sequence[Tuple[int, float]]) -> None:
        """Scale the final Linear's rows (weight and bias) so that each segment of the generated row,
        ``(length, std)`` back to back, starts with that standard deviation over the group's layers."""
        if self.linear2.weight.is_meta:
            return
        out = self.out_scale * F.linear(F.gelu(F.linear(self.inputs(), self.linear1.weight, self.linear1.bias)),
                                        self.linear2.weight, self.linear2.bias)
        start = 0
        for length, std in segments:
            scale = std / float(out[:, start:start + length].std().clamp_min(1e-12))
            self.linear2.weight[start:start + length].mul_(scale)
            self.linear2.bias[start:start + length].mul_(scale)
            start += length

    def _apply(self, fn, recurse=True):
        # The positions are a function of the layer indices, not saved (a non-persistent buffer): after
        # a move, a cast or ``to_empty`` (which leaves every buffer uninitialised, as FSDP2's and
        # distributed checkpointing's meta-device flows do, where a load then restores only the saved
        # tensors) they are computed again, so no flow can leave them garbage.
        out = super()._apply(fn, recurse)
        if self.positions is not None and not self.positions.is_meta:
            with torch.no_grad():
                self.positions.copy_(sinusoidal_positions(self.layers, self.positions.shape[1]))
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Adapters saved before out_scale existed were trained without it: load them with 1.
        key = prefix + "out_scale"
        if key not in state_dict:
            state_dict[key] = torch.ones((), dtype=self.out_scale.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def inputs(self) -> Tensor:
        """E = e (or [e, p]) for every layer of the group: [L_g, h_in]."""
        if self.positions is None:
            return self.embed
        return torch.cat((self.embed, self.positions.to(self.embed.dtype)), dim=1)

    def watched(self) -> Tuple[Tensor, ...]:
        """The tensors whose in-place changes make previously generated rows stale.

        Read from the attributes on every call (never kept): FSDP2 swaps parameter
        objects between sharded and unsharded forms."""
        return (self.embed, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias)

    def forward(self, op: HypernetOp) -> Tensor:
        rows = op(self.inputs(), self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias)
        return rows * self.out_scale.to(rows.dtype)

    def extra_repr(self) -> str:
        return f"layers={self.layers}, positional={self.positions is not None}"


def row_size(shapes: Sequence[Tuple[int, ...]]) -> int:
    """P: the length of one layer's row holding tensors of these shapes back to back."""
    return sum(math.prod(s) for s in shapes)


def unpack_rows(rows: Tensor, shapes: Sequence[Tuple[int, ...]]) -> List[List[Tensor]]:
    """[L_g, P] -> out[layer][target], each a contiguous view of ``shapes[target]``.

    One split along P, then one view and one unbind per target: a handful of autograd
    nodes however many layers there are, and no copies (every result aliases ``rows``).
    The backward of this is a stack per target and one cat, into the [L_g, P] gradient.
    """
    n = rows.shape[0]
    per_target = [chunk.view(n, *shape).unbind(0)
                  for chunk, shape in zip(rows.split([math.prod(s) for s in shapes], dim=1), shapes)]
    return [list(layer) for layer in zip(*per_target)]


__all__ = ["hypernet_op", "group_layers", "sinusoidal_positions", "LayerGenerator", "row_size", "unpack_rows",
           "HypernetOp"]
