"""Shaper proper: the translator's output -> ``K`` control vectors with learnable strengths; their mean is the shift
added to the INPUT embedding of the current mask token (logits are never edited directly).

``MLP D -> 2D -> K*D`` gives ``v_1 .. v_K``; the shift is ``mean_k(s_k * v_k)``. The strengths ``s`` start at zero,
so an untrained shaper leaves HiMTok's decoding exactly as it was, and stage-1 training grows them from there.
"""

from __future__ import annotations

import torch
from torch import nn


class ControlShaper(nn.Module):
    def __init__(self, dim: int, num_controls: int = 4) -> None:
        super().__init__()
        self.num_controls = num_controls
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, num_controls * dim))
        self.strengths = nn.Parameter(torch.zeros(num_controls))

    def vectors(self, c: torch.Tensor) -> torch.Tensor:
        """``c (B, D)`` -> the control vectors ``(B, K, D)`` before their strengths."""
        return self.mlp(c.to(self.strengths.dtype)).unflatten(-1, (self.num_controls, c.shape[-1]))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """``c (B, D)`` -> the input-embedding shift ``(B, D)``."""
        return (self.vectors(c) * self.strengths[:, None]).mean(dim=1)
