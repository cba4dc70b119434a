"""Condenser: a few learned queries cross-attend over a variable set of hidden states, then an MLP.

The shaper uses two: a SHORT one over a ring buffer of the most recent last-layer hidden states (its queries,
mean-pooled, are ``m``: what decoding is doing right now, read by the invoker and the translator), and a LONG one
over every hidden state of the current mask span plus the image positions (its queries are the memory tokens the
latent thought reads).
"""

from __future__ import annotations

import torch
from torch import nn


def attention_heads(dim: int, wanted: int) -> int:
    """The largest head count ``<= wanted`` that divides ``dim`` (tiny test models have odd widths)."""
    for heads in range(max(1, min(wanted, dim)), 0, -1):
        if dim % heads == 0:
            return heads
    return 1


class Condenser(nn.Module):
    """``states (B, N, D)`` + ``valid (B, N)`` -> ``(B, Q, D)`` condensed tokens.

    Pre-norm cross-attention with a residual on the queries, then a residual pre-norm MLP. Keys are layer-normed
    because last-layer hidden states and image states differ in scale. Every row must have at least one valid
    state (an all-masked row would make attention return NaN); callers always include the current token.
    """

    def __init__(self, dim: int, num_queries: int, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim ** -0.5)
        self.norm_states = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, attention_heads(dim, heads), batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b = states.shape[0]
        keys = self.norm_states(states.to(self.queries.dtype))
        queries = self.queries[None].expand(b, -1, -1)
        attended, _ = self.attention(queries, keys, keys, key_padding_mask=~valid.bool(), need_weights=False)
        x = queries + attended
        return x + self.mlp(self.norm_mlp(x))

    def pooled(self, states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The mean of the condensed tokens: ``(B, D)``."""
        return self.forward(states, valid).mean(dim=1)
