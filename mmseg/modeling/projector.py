"""The LLaVA projector (vision width ``Dv`` -> LM width ``D``) and the optional patch merger for the LM prefix."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """``(B, P, Dv) -> (B, P, D)``: Linear -> GELU -> Linear, as in LLaVA-1.5.

    ``out_scale``: when given, the output is RMS-normalised and multiplied by a learnable per-channel gain that
    starts at ``out_scale`` (the LM's token-embedding RMS). Why: a language model trained from scratch starts
    with token embeddings of RMS ~0.02 while an unnormalised projector emits features of RMS ~0.2 that grow
    during training (we measured 56x the text scale after an hour). Image features then dominate the residual
    stream of every position they enter (STAMP's mask queries start from them), so attention to the text
    barely changes those positions and the model cannot learn which object the text means. A pretrained LM
    with a pretrained projector does not need this, so it is off by default.
    """

    def __init__(self, vision_width: int, lm_width: int, out_scale: float | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_width, lm_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(lm_width, lm_width)
        self.gain = nn.Parameter(torch.full((lm_width,), float(out_scale))) if out_scale is not None else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(features)))
        if self.gain is not None:
            rms = out.float().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt().to(out.dtype)
            out = out * rms * self.gain.to(out.dtype)
        return out


class PatchMerger(nn.Module):
    """``(B, gh*gw, D) -> (B, (gh/m)*(gw/m), D)``: each ``m x m`` block of patch features, concatenated, through
    one Linear (initialised to the block mean, so it starts as average pooling and learns from there).

    Used for the LM's image PREFIX only (heads keep the full-resolution features): fewer image positions make
    every step cheaper, and leave the text a larger share of each attention row early in training.
    """

    def __init__(self, width: int, grid: tuple[int, int], merge: int) -> None:
        super().__init__()
        gh, gw = grid
        if gh % merge or gw % merge:
            raise ValueError(f"image_merge={merge} must divide the patch grid {gh}x{gw}")
        self.grid, self.merge = (gh, gw), merge
        self.proj = nn.Linear(merge * merge * width, width)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(width).repeat(1, merge * merge) / (merge * merge))
            self.proj.bias.zero_()

    @property
    def num_tokens(self) -> int:
        return (self.grid[0] // self.merge) * (self.grid[1] // self.merge)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, d = features.shape
        (gh, gw), m = self.grid, self.merge
        blocks = features.reshape(b, gh // m, m, gw // m, m, d).permute(0, 1, 3, 2, 4, 5)
        return self.proj(blocks.reshape(b, (gh // m) * (gw // m), m * m * d))
