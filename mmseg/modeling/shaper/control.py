"""Shaper proper: the translator's output -> ``K`` control vectors with learnable strengths; their mean is the shift
added to the INPUT embedding of the current mask token (the shift edits no logit; the optional
:mod:`.code_steer` does).

``MLP D -> 2D -> K*D`` gives ``v_1 .. v_K``; the shift is ``mean_k(s_k * v_k)``. The MLP's last layer starts at zero
and the strengths at one, so an untrained shaper leaves HiMTok's decoding exactly as it was.

Why the zero sits in the last layer and not in the strengths (as it first did): with ``s = 0`` and random ``v``, the
strengths' gradient ``E[v . g]`` (``g`` the loss gradient at the shifted embedding) averages out to noise, and the
MLP's gradient is ``s`` times a consistent term, so its direction flips with the noise in ``s``: a saddle that
stage 1 never left (|s| <= 0.009 after 2,000 Adam steps on ``synthref-himtok``). A zero last layer behind a live
one gets the consistent gradient ``g h^T`` from the first step (ControlNet's zero convolutions do the same).
"""

from __future__ import annotations

import torch
from torch import nn


class ControlShaper(nn.Module):
    def __init__(self, dim: int, num_controls: int = 4) -> None:
        super().__init__()
        self.num_controls = num_controls
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, num_controls * dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.strengths = nn.Parameter(torch.ones(num_controls))

    def vectors(self, c: torch.Tensor) -> torch.Tensor:
        """``c (B, D)`` -> the control vectors ``(B, K, D)`` before their strengths."""
        return self.mlp(c.to(self.strengths.dtype)).unflatten(-1, (self.num_controls, c.shape[-1]))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """``c (B, D)`` -> the input-embedding shift ``(B, D)``."""
        return (self.vectors(c) * self.strengths[:, None]).mean(dim=1)
