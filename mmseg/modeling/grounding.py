"""Grounding probe: the LM's image positions learn, inside the prefix, which part of the image the answer is about.

Why: an LLaVA-style LM trained from scratch learns to *read* its image tokens slowly. Measured on SynthRef
(tiny-stamp, session 3): STAMP's mask queries, which get a dense per-patch loss, bound colour and kind to the
request within 1,000 steps, while the answer text's image-dependent words (the target's colour, kind and place;
QA answers) stayed at chance for 2,000+ steps. The text has to find the referent by attention with no dense
signal telling any position where it is.

With the image placed *after* the request (``ModelConfig.image_position = "after"``), every image position already
sees the request, exactly like a mask query. This probe gives those positions the queries' kind of signal: a
``LayerNorm -> Linear(D, 1)`` on the hidden state after LM layer ``ground_layer`` predicts, per image position, how
much of its cell the *focus* covers (the referent; the objects a question is about; nothing for a no-target
request). The layers above ``ground_layer`` then only need one attention hop from an answer token to the positions
that light up, to read their colour, kind and place, or to notice that none does. Training only: inference runs
the LM unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmseg.modeling.losses import dice_loss, downsample_targets


class GroundingProbe(nn.Module):
    """``LayerNorm(D) -> Linear(D, 1)`` over the image positions of LM layer ``layer``'s output."""

    def __init__(self, hidden_size: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.norm = nn.LayerNorm(hidden_size)
        self.score = nn.Linear(hidden_size, 1)

    def logits(self, hidden: torch.Tensor, placeholders: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``hidden (B, T, D)`` at layer ``self.layer``, ``placeholders (B, T)`` bool marking the ``gh*gw`` image
        positions of each row (row-major) -> ``(B, gh, gw)`` float logits."""
        b = hidden.shape[0]
        image = hidden[placeholders].reshape(b, grid[0] * grid[1], -1)
        return self.score(self.norm(image)).float().reshape(b, *grid)

    def loss(self, hidden: torch.Tensor, placeholders: torch.Tensor, focus: torch.Tensor, valid: torch.Tensor,
             grid: tuple[int, int]) -> torch.Tensor:
        """BCE against each cell's focus coverage (a soft target in [0, 1]) plus soft Dice on rows whose focus is not
        empty. ``focus (B, S, S)`` in {0, 1} placed like the image; ``valid (B,)`` bool (rows with unknown focus
        are left out). Returns a float32 scalar (0 with a graph when no row is valid)."""
        logits = self.logits(hidden, placeholders, grid)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        logits, target = logits[valid], downsample_targets(focus[valid], grid)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        present = target.flatten(1).sum(1) > 0
        if bool(present.any()):
            loss = loss + dice_loss(logits[present], target[present])
        return loss
