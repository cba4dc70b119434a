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


def gaussian_blur(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``(N, h, w)`` soft masks with a Gaussian of ``sigma`` pixels (zero padding: outside is background).

    Used for coarse targets: a mask decoded from few tokens cannot carry sharp edges, so it is compared with a
    softened target rather than being pushed toward details it cannot represent."""
    if sigma <= 0:
        return masks
    radius = max(1, int(3.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=masks.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(masks.dtype)
    out = masks[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0)), kernel.view(1, 1, 1, -1))  # along width
    out = F.conv2d(F.pad(out, (0, 0, radius, radius)), kernel.view(1, 1, -1, 1))  # along height
    return out[:, 0]


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, first_weight: float = 1.0) -> torch.Tensor:
    """Next-token cross-entropy of ``logits (B, T, V)`` against ``labels (B, T)`` (-100 = not scored), with each
    row's first scored token weighted ``first_weight`` times; normalised by the number of scored tokens, so
    ``first_weight = 1`` is the plain mean and the other tokens' gradient never shrinks as the weight grows.

    Why the first token: in an answer it is the decision (a target answer or a refusal; a QA answer's word), and
    every later token follows from it (see ``TrainConfig.decision_weight``)."""
    targets = labels[:, 1:]
    scored = targets != -100  # (B, T-1)
    # Only the scored positions go through the (fp32) log-softmax: most of a sequence is prompt and image.
    ce = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")  # (n,)
    count = scored.sum().clamp(min=1)
    if first_weight == 1.0:
        return ce.sum() / count
    first = scored.long().cumsum(1) == 1  # (B, T-1): each row's first scored position (where scored)
    return (ce.sum() + (first_weight - 1.0) * ce[first[scored]].sum()) / count
