"""HyperAdaLoRA's state-update hypernetworks: P_{i+1} = H_P(P_i; Φ_P), and the same for Λ and Q.

Tokens are rank components. P [N, r] is r tokens (its columns) of length N; Q [r, K] is r
tokens (its rows) of length K; Λ [r] is r tokens of length 1. Every slot's state is one
sequence of r tokens, and a hypernetwork maps the sequence to its update:

    H(S) = S + out_L(core(in_L(S))) / h      S: [slots, r, L], tokens of length L

``in_L`` / ``out_L`` are Linear projections between the token length L and the width h,
one pair per distinct length (GQA's narrow v_proj gets its own), and ``core`` is shared by
every slot and length. ``out_L`` starts at zero, so H starts as the identity: the model
starts where the state is. All slots go through the core as one batch: the slots of one
length are stored stacked ([n_L, r, L]), each length is projected, the results are
concatenated to [slots, r, h], and the core runs once.

Cores (``CORES``):
  "attention"  a BERT layer over the r tokens: multi-head self-attention, residual and
               LayerNorm, feed-forward (h → 4h → h, GeLU), residual and LayerNorm.
  "mlp"        per token Linear(h → 4h), GeLU, Linear(4h → h), run as the adapter backend's
               ``hypernet`` op, so the Triton and C++ kernels generate every slot in one launch.
  "cnn"        Conv1d over the token sequence (kernel 3, padding 1), GeLU, Conv1d, with h channels.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import functions
from ..ops.backend import Backend

Tensor = torch.Tensor
FFN_MULT = 4  # BERT's intermediate size is 4× the hidden size


class AttentionCore(nn.Module):
    """One post-LayerNorm BERT layer over each slot's r tokens. x: [slots, r, h]."""

    def __init__(self, h: int, heads: int, **factory):
        super().__init__()
        if h % heads:
            raise ValueError(f"hidden_dim={h} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(h, 3 * h, **factory)
        self.proj = nn.Linear(h, h, **factory)
        self.norm1 = nn.LayerNorm(h, **factory)
        self.ffn1 = nn.Linear(h, FFN_MULT * h, **factory)
        self.ffn2 = nn.Linear(FFN_MULT * h, h, **factory)
        self.norm2 = nn.LayerNorm(h, **factory)

    def forward(self, x: Tensor, backend: Backend) -> Tensor:
        n, r, h = x.shape
        q, k, v = self.qkv(x).view(n, r, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, r, h)
        x = self.norm1(x + self.proj(a))
        return self.norm2(x + self.ffn2(F.gelu(self.ffn1(x))))


class MLPCore(nn.Module):
    """Per-token Linear → GeLU → Linear through the dispatched hypernet op (one launch for all tokens)."""

    def __init__(self, h: int, heads: int, **factory):
        super().__init__()
        self.fc1 = nn.Linear(h, FFN_MULT * h, **factory)
        self.fc2 = nn.Linear(FFN_MULT * h, h, **factory)

    def forward(self, x: Tensor, backend: Backend) -> Tensor:
        y = functions.hypernet(x.reshape(-1, x.shape[-1]), self.fc1.weight, self.fc1.bias, self.fc2.weight,
                               self.fc2.bias, backend=backend)
        return y.view(x.shape)


class CNNCore(nn.Module):
    """Conv1d (kernel 3, padding 1) over the r-token sequence, GeLU, Conv1d; channels are the width."""

    def __init__(self, h: int, heads: int, **factory):
        super().__init__()
        self.conv1 = nn.Conv1d(h, FFN_MULT * h, 3, padding=1, **factory)
        self.conv2 = nn.Conv1d(FFN_MULT * h, h, 3, padding=1, **factory)

    def forward(self, x: Tensor, backend: Backend) -> Tensor:
        return self.conv2(F.gelu(self.conv1(x.transpose(1, 2)))).transpose(1, 2)


CORES: Dict[str, type] = {"attention": AttentionCore, "mlp": MLPCore, "cnn": CNNCore}


class StateUpdateNet(nn.Module):
    """H for one parameter kind (P, Λ or Q), shared by every slot: G = S + out_L(core(in_L(S)))."""

    def __init__(self, lengths: Sequence[int], core: str, hidden_dim: int, heads: int, **factory):
        super().__init__()
        if core not in CORES:
            raise ValueError(f"unknown hypernet {core!r}; valid choices: {', '.join(CORES)}")
        self.kind = core
        self.lengths = list(lengths)
        self.inp = nn.ModuleList(nn.Linear(L, hidden_dim, **factory) for L in self.lengths)
        self.out = nn.ModuleList(nn.Linear(hidden_dim, L, **factory) for L in self.lengths)
        for lin in self.out:  # H starts as the identity
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.core = CORES[core](hidden_dim, heads, **factory)
        # One Adam step moves every out-projection weight by about lr, and a generated entry sums h
        # of them: 1/h keeps a step's change of a generated entry near lr, as a step of a trained
        # AdaLoRA entry is, so both methods work at the same learning rate.
        self.out_scale = 1.0 / hidden_dim

    def forward(self, states: Sequence[Tensor], backend: Backend) -> List[Tensor]:
        """states[i]: [n_i, r, lengths[i]] → the generated [n_i, r, lengths[i]], one core call for all
        (the MLP core's on ``backend``'s hypernet kernels)."""
        tokens = torch.cat([proj(s) for proj, s in zip(self.inp, states)], dim=0)
        hidden = self.core(tokens, backend).split([s.shape[0] for s in states], dim=0)
        return [s + self.out_scale * proj(y) for proj, s, y in zip(self.out, states, hidden)]


__all__ = ["StateUpdateNet", "CORES", "AttentionCore", "MLPCore", "CNNCore"]
