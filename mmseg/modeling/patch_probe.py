"""Dense attribute supervision of the image features: each patch names the object under it.

An LLaVA-style model trained from scratch learns to *read* its image tokens slowly: the only signal that
reaches the vision tower is what the text and mask losses pass back through the LM, and at first the LM does not
attend to the image, so the tower gets almost nothing to learn from. Measured on SynthRef (tiny-stamp, described
answers): teacher-forced, the mask step reached Dice ~0.87 within 1,000 steps, yet the answer's own words about
the target (its colour, kind and place) stayed at chance for 2,000 steps (text CE flat at 0.30 per token). A
linear probe per attribute family over every patch feature, trained on labels the annotations already hold (the
category; SynthRef's colour), gives the tower a direct, dense signal from step one, so the features the LM and
the mask queries read are discriminative before the LM learns where to look.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class PatchProbe(nn.Module):
    """One ``Linear(D, 1 + classes)`` per attribute family (class 0 = background)."""

    def __init__(self, hidden_size: int, families: dict[str, list[str]]) -> None:
        super().__init__()
        self.families = {name: list(classes) for name, classes in families.items()}
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, 1 + len(c)) for name, c in self.families.items()})

    def loss(self, features: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
             min_cover: float = 0.3) -> torch.Tensor:
        """``features (B, P, D)`` per patch (row-major ``grid``), ``labels (B, F, S, S)`` long pixel labels per
        family in this module's order (0 = background, ``IGNORE`` = unknown) -> mean cross-entropy.

        A patch's label is the class covering most of it; background if objects cover less than ``min_cover``;
        ignored where unknown pixels dominate."""
        gh, gw = grid
        total = features.new_zeros((), dtype=torch.float32)
        for f, (name, head) in enumerate(self.heads.items()):
            target = _pool_labels(labels[:, f], head.out_features, (gh, gw), min_cover)  # (B, P)
            logits = head(features).float()  # (B, P, C)
            if bool((target != IGNORE).any()):
                total = total + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        return total / max(1, len(self.heads))


def _pool_labels(labels: torch.Tensor, classes: int, grid: tuple[int, int], min_cover: float) -> torch.Tensor:
    """``(B, S, S)`` pixel labels -> ``(B, gh*gw)`` patch labels (majority class; see :meth:`PatchProbe.loss`)."""
    # Four label samples per patch side (16 per patch) measure coverage well enough and cut the work 16-fold at
    # 128 px / 8x8 patches; small label maps are used whole.
    step = max(1, min(labels.shape[-2] // (4 * grid[0]), labels.shape[-1] // (4 * grid[1])))
    labels = labels[..., step // 2 :: step, step // 2 :: step]
    unknown = labels == IGNORE
    # Compare against the class ids instead of F.one_hot: one_hot validates its input with a full min/max pass and
    # was ~40 ms per family at batch 32 on a CPU, more than the LM's forward.
    ids = torch.arange(classes, device=labels.device)[None, :, None, None]
    onehot = (labels[:, None] == ids).float()  # (B, C, S, S); unknown pixels (-100) match no class
    cover = F.adaptive_avg_pool2d(onehot, grid)  # (B, C, gh, gw) share of each class
    unknown_share = F.adaptive_avg_pool2d(unknown[:, None].float(), grid)[:, 0]
    fg_share, fg_class = cover[:, 1:].max(1)
    target = torch.where(cover[:, 1:].sum(1) >= min_cover, fg_class + 1, torch.zeros_like(fg_class))
    target = target.masked_fill(unknown_share > fg_share.clamp(min=cover[:, 0]), IGNORE)
    return target.flatten(1)
