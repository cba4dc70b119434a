"""Translator: the latent thought ``z``, the condensed state ``m`` and the pooled prompt ``p`` -> one vector ``c``.

``[z, m, p] (3D) -> LayerNorm -> Linear 3D->2D -> GELU -> Linear 2D->D = c``, then gated ``c * tanh(Linear(LN(c)))``
so the network can switch its own output off per dimension (LatentMorph's gate).
"""

from __future__ import annotations

import torch
from torch import nn


class Translator(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(3 * dim), nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gate_norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor, m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``z, m, p (B, D)`` -> ``(B, D)``."""
        dtype = self.gate.weight.dtype
        c = self.body(torch.cat([z, m, p], dim=-1).to(dtype))
        return c * torch.tanh(self.gate(self.gate_norm(c)))
