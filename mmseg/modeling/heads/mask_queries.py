"""Mask queries: one position per vision patch, run through the LM after a mask point (STAMP's device).

Query ``i`` has input ``projected_feature[i] + mask_embedding (+ position_i)``. The queries attend causally to
the text up to and including the mask point (``<seg>``, or HiMTok's ``<mt_start>``) and bidirectionally to each
other, and all share the position right after the mask point: their order carries no meaning (the patch feature
and the learned position say where each query sits). Text never attends to them, so running them at the mask
point (training) and after the text is done or mid-decoding (inference, :func:`run_mask_queries`) is the same.

Why a head wants them: the prefix's image positions come BEFORE the answer, so they cannot read the answer's
naming of the referent; queries placed after the mask point read the request, the image and the answer alike,
one per patch, at the vision tower's full grid even when the prefix merges patches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mmseg.modeling.heads.base import ExtraInputs

if TYPE_CHECKING:
    from mmseg.generation import DecodeSession


class MaskQueries(nn.Module):
    """``(B, P, D)`` projected patch features -> ``(B, P, D)`` query input embeddings: the features plus a shared
    mask embedding plus a learned embedding per patch (a spatial prior for positional expressions)."""

    def __init__(self, hidden_size: int, patches: int) -> None:
        super().__init__()
        self.patches = patches
        self.mask_embedding = nn.Parameter(torch.randn(hidden_size) * 0.02)
        self.position = nn.Parameter(torch.randn(patches, hidden_size) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.patches:
            raise ValueError(f"mask queries were built for {self.patches} patches, the image has {features.shape[1]}")
        return features + (self.mask_embedding + self.position).to(features.dtype)


def query_training_inputs(queries: torch.Tensor, seg_positions: torch.Tensor,
                          attention_mask: torch.Tensor) -> ExtraInputs:
    """Training: ``queries (B, P, D)`` appended after the padded text ``attention_mask (B, T)``, each row's
    queries reading its text through ``seg_positions (B,)`` (-1: a row without a mask point, whose queries see
    only themselves, one each, so that no row is fully blocked)."""
    b, t = attention_mask.shape
    p = queries.shape[1]
    has = seg_positions >= 0
    upto = torch.arange(t, device=seg_positions.device)[None, :] <= seg_positions[:, None]  # (B, T)
    text_part = (attention_mask.bool() & upto)[:, None, :].expand(b, p, t)
    query_part = has[:, None, None].expand(b, p, p) | torch.eye(p, dtype=torch.bool, device=seg_positions.device)
    positions = (seg_positions.clamp(min=0) + 1)[:, None].expand(b, p)
    return ExtraInputs(queries, torch.cat([text_part, query_part], -1), positions)


def run_mask_queries(session: "DecodeSession", queries: torch.Tensor, points: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """Inference: run ``queries (B, P, D)`` for the rows ``rows (B,)`` bool, reading each row's cache through its
    mask point ``points (B,)`` (cache indices; any value where ``rows`` is False). The KV cache is cropped back
    afterwards. Returns their last hidden states ``(B, P, D)`` (meaningless where ``rows`` is False)."""
    p = queries.shape[1]
    upto = torch.arange(session.cache_length, device=session.device)[None, :] <= points[:, None]
    text_part = (session.cache_valid & upto & rows[:, None])[:, None, :].expand(-1, p, -1)
    query_part = rows[:, None, None].expand(-1, p, p) | torch.eye(p, dtype=torch.bool, device=session.device)
    attention = torch.cat([text_part, query_part], -1)[:, None]  # (B, 1, P, L + P)
    positions = (session.positions_of(points) + 1)[:, None].expand(-1, p)
    return session.run_extra(queries, attention, positions)


__all__ = ["MaskQueries", "query_training_inputs", "run_mask_queries"]
