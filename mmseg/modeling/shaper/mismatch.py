"""Mismatch probe: does the answer name another object than the request asks for?

``[mean of the long condenser's memory tokens, p] (2D) -> LayerNorm -> Linear 2D->D -> GELU -> Linear D->1`` gives a
logit, read once per mask at ``<mt_start>`` from the memory over the image positions, every text position before
the span (the request and the answer's words: the head's ``memory_text``) and the ``<mt_start>`` state. Trained in
stage 1 with BCE against whether the frozen model's own answer differs from the trained one (``own_answers``). Its
probability scales every shaping round of that mask (the input shift and the code-steer terms) and is an input of
the learned invoker.

Why: a shaper trained on answers that half the time name another object learns to move masks away from the named
object, and it did so whether the words were right or not (session 31, ``memory_text`` on ``synthref-himtok``:
misnamed testB answers 0.269 -> 0.356 cIoU with every round, named ones 0.910 -> 0.854). A round scaled by the
probability that the words are wrong leaves a mask whose words are right nearly as it was. The last layer starts at
zero, so an untrained probe says 0.5 everywhere.
"""

from __future__ import annotations

import torch
from torch import nn


class MismatchProbe(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, memory: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """``memory (B, Q, D)`` (the long condenser's tokens) and ``prompt (B, D)`` (the pooled prompt ``p``) ->
        logits ``(B,)`` float that the words before the mask name another object than the request."""
        dtype = self.body[1].weight.dtype
        x = torch.cat([memory.mean(dim=1), prompt], dim=-1).to(dtype)
        return self.body(x).squeeze(-1).float()
