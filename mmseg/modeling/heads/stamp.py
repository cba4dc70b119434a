"""STAMP: all-mask prediction in one forward pass.

After the answer text reaches ``<seg>``, one mask query per image patch is appended. Query ``i`` has input
``mask_embedding + projected_feature[i]``; the queries attend causally to the prefix up to ``<seg>`` and
bidirectionally to each other. All queries share the position right after ``<seg>``, so the mask does not
depend on how long the prompt was, and their order carries no meaning (the patch feature already encodes
where each query sits).

A mask read off the patch grid alone is blocky (an 8x8 grid caps cIoU near 0.9 even when every patch is
right), so each query predicts an ``upsample x upsample`` block of a feature map (pixel shuffle) that a small
convolutional refiner fuses with a stride-4 stem over the raw pixels, giving sharp object edges.

Two options (on in our presets) make grounding learnable in minutes on a CPU rather than hours:

- ``seg_kernel``: besides STAMP's ``Linear(D, 1)``, each query's logit gets a bilinear term with the
  ``<seg>`` token's own last hidden state, ``<K q_i, S h_seg> / sqrt(d)``: a direct match between "what this
  patch is" and "what the answer refers to" instead of one that attention alone must discover;
- ``query_positions``: a learned embedding per query (patch) added to its input, a spatial prior for
  positional expressions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmseg.modeling.heads.base import ExtraInputs, MaskHead, MaskPrediction, register_head
from mmseg.modeling.heads.mask_queries import query_training_inputs, run_mask_queries
from mmseg.modeling.losses import bce_loss, dice_loss, downsample_targets

if TYPE_CHECKING:
    from mmseg.generation import DecodeSession


@dataclass(frozen=True)
class StampConfig:
    upsample: int = 4  # each query predicts an upsample x upsample block of the mask
    refine_channels: int = 32
    bce_weight: float = 0.3
    dice_weight: float = 0.7
    mask_loss_weight: float = 1.0
    seg_kernel: bool = False
    kernel_dim: int = 64
    query_positions: bool = False


class PixelRefiner(nn.Module):
    """Fuse pixel-shuffled query features ``(B, C, h, w)`` with a stride-4 conv stem over the image."""

    def __init__(self, channels: int, extra_inputs: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * channels + extra_inputs, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, query_maps: torch.Tensor, pixel_values: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """``query_maps (B, C, h, w)``, ``pixel_values (B, 3, S, S)``, optional ``guide (B, k, h, w)`` -> ``(B, h, w)``."""
        stem = self.stem(pixel_values)
        if stem.shape[-2:] != query_maps.shape[-2:]:
            stem = F.interpolate(stem, size=query_maps.shape[-2:], mode="bilinear", align_corners=False)
        parts = [query_maps, stem] + ([guide] if guide is not None else [])
        return self.fuse(torch.cat(parts, dim=1))[:, 0]


@register_head
class StampHead(MaskHead):
    name = "stamp"
    config_cls = StampConfig

    def __init__(self, config: StampConfig, hidden_size: int, image_size: int, grid_size: tuple[int, int],
                 asset_dir: Path | None = None, prefix_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.grid_size = grid_size  # one query per vision patch, however the prefix is merged (prefix_grid unused)
        s, c = config.upsample, config.refine_channels
        self.mask_embedding = nn.Parameter(torch.randn(hidden_size) * 0.02)
        self.coarse = nn.Linear(hidden_size, 1)  # STAMP's own per-query logit
        self.to_blocks = nn.Linear(hidden_size, c * s * s)
        self.refiner = PixelRefiner(c, extra_inputs=1 if config.seg_kernel else 0)
        if config.seg_kernel:
            self.kernel_query = nn.Linear(hidden_size, config.kernel_dim)
            self.kernel_seg = nn.Linear(hidden_size, config.kernel_dim)
        if config.query_positions:
            self.query_position = nn.Parameter(torch.randn(grid_size[0] * grid_size[1], hidden_size) * 0.02)

    @property
    def num_queries(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def mask_queries(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(B, P, D)`` projected patch features -> ``(B, P, D)`` query input embeddings."""
        queries = image_features + self.mask_embedding.to(image_features.dtype)
        if self.config.query_positions:
            queries = queries + self.query_position.to(image_features.dtype)
        return queries

    def mask_logits(self, query_hidden: torch.Tensor, pixel_values: torch.Tensor,
                    seg_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, P, D)`` last hidden states of the queries (and ``(B, D)`` of ``<seg>`` when ``seg_kernel``)
        -> ``(B, gh*s, gw*s)`` mask logits."""
        b, _, d = query_hidden.shape
        (gh, gw), s = self.grid_size, self.config.upsample
        coarse = self.coarse(query_hidden)  # (B, P, 1)
        if self.config.seg_kernel:
            if seg_hidden is None:
                raise ValueError("this STAMP head matches queries against <seg>: pass seg_hidden")
            match = self.kernel_query(query_hidden) @ self.kernel_seg(seg_hidden.to(query_hidden.dtype))[:, :, None]
            coarse = coarse + match / self.config.kernel_dim**0.5
        coarse = coarse.transpose(1, 2).reshape(b, 1, gh, gw)
        blocks = self.to_blocks(query_hidden).transpose(1, 2).reshape(b, -1, gh, gw)  # (B, C*s*s, gh, gw)
        maps = F.pixel_shuffle(blocks, s)  # (B, C, gh*s, gw*s)
        coarse_up = F.interpolate(coarse, scale_factor=s, mode="bilinear", align_corners=False)
        guide = coarse_up if self.config.seg_kernel else None  # the refiner sharpens the selected region
        fine = self.refiner(maps, pixel_values.to(maps.dtype), guide)
        return coarse_up[:, 0] + fine

    # -- training ---------------------------------------------------------------------------------------
    def extra_inputs(self, batch: dict[str, torch.Tensor], image_features: torch.Tensor) -> ExtraInputs:
        return query_training_inputs(self.mask_queries(image_features), batch["seg_positions"],
                                     batch["attention_mask"])

    def loss(self, batch, text_hidden, text_logits, extra_hidden):
        has = batch["seg_positions"] >= 0
        if not bool(has.any()):
            return {"mask_bce": text_hidden.sum() * 0.0, "mask_dice": text_hidden.sum() * 0.0}
        rows = has.nonzero()[:, 0]
        seg_hidden = text_hidden[rows, batch["seg_positions"][rows]]  # (N, D) hidden state at <seg>
        logits = self.mask_logits(extra_hidden[rows], batch["pixel_values"][rows], seg_hidden).float()
        target = downsample_targets(batch["mask_targets"][has], logits.shape[-2:])
        w = self.config.mask_loss_weight
        return {
            "mask_bce": w * self.config.bce_weight * bce_loss(logits, target),
            "mask_dice": w * self.config.dice_weight * dice_loss(logits, target),
        }

    # -- inference --------------------------------------------------------------------------------------
    def decode(self, session: "DecodeSession") -> list[list[MaskPrediction]]:
        """One query pass per mask index k over all rows that emitted a k-th ``<seg>``.

        Text after ``<seg>`` never attends the queries, so running them after the text is done is the same
        as running them at ``<seg>``, and lets a whole batch share one pass. The prefix KV cache is reused and
        cropped back afterwards.
        """
        results: list[list[MaskPrediction]] = [[] for _ in range(session.batch_size)]
        most = max((len(points) for points in session.mask_points), default=0)
        queries = self.mask_queries(session.image_features)
        for k in range(most):
            rows = torch.tensor([len(points) > k for points in session.mask_points], device=session.device)
            seg = torch.tensor([points[k] if len(points) > k else 0 for points in session.mask_points], device=session.device)
            hidden = run_mask_queries(session, queries, seg, rows)  # crops the cache back
            seg_hidden = torch.stack([
                points[k] if len(points) > k else torch.zeros_like(hidden[0, 0]) for points in session.point_hidden
            ])
            logits = self.mask_logits(hidden, session.pixel_values, seg_hidden).float()
            for b in range(session.batch_size):
                if rows[b]:
                    results[b].append(MaskPrediction(logits[b]))
        return results
