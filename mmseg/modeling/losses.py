"""Mask losses shared by the heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice on ``(N, h, w)`` logits against targets in [0, 1]; mean over N."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(-1)
    return (1 - (2 * inter + eps) / (prob.sum(-1) + target.sum(-1) + eps)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over pixels."""
    return F.binary_cross_entropy_with_logits(logits, target)


def downsample_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, S, S)`` masks in {0,1} -> ``(N, h, w)`` area fractions (soft targets that keep thin parts)."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), size)[:, 0]
