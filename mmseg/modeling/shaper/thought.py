"""Latent thought: the frozen LM reads a fixed think-prompt followed by the memory tokens; no text is decoded.

This is a separate forward over a fresh sequence (positions ``0 .. T+Q-1``, plain causal attention, no cache), so
it never touches a decode session's KV cache. The LM's weights stay frozen, but gradients flow through it to the
memory tokens (and so to the long condenser) during stage-1 training.
"""

from __future__ import annotations

import torch
from torch import nn


def latent_thought(decoder: nn.Module, prompt_embeds: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``prompt_embeds (T, D)`` (the think-prompt's input embeddings) and ``memory (B, Q, D)`` -> ``z (B, D)``.

    ``z`` is the mean last-layer hidden state over the MEMORY positions: under causal attention the think-prompt's
    own positions are identical for every query, so including them would only add a constant.
    """
    b, q, _ = memory.shape
    dtype = next(decoder.parameters()).dtype
    prompt = prompt_embeds.to(dtype)[None].expand(b, -1, -1)
    embeds = torch.cat([prompt, memory.to(dtype)], dim=1)  # (B, T + Q, D)
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None].expand(b, -1)
    hidden = decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
    return hidden[:, -q:].float().mean(dim=1)
