"""The LLaVA projector: a two-layer MLP from vision width ``Dv`` to the LM width ``D``."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """``(B, P, Dv) -> (B, P, D)``: Linear -> GELU -> Linear, as in LLaVA-1.5."""

    def __init__(self, vision_width: int, lm_width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_width, lm_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(lm_width, lm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))
