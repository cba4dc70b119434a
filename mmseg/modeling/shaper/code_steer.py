"""Code steer: the translator's output ``c`` -> terms for the code logits of the mask tokens still to come.

``Linear(D, K * code_dim)`` (zero at the start) gives one vector ``u_k`` per mask position; code ``j`` at position
``k`` gains ``<u_k, c_j>`` (``c_j`` the frozen mask tokenizer's normalised code vector), for the positions AFTER the
shaped token only. Off unless the head's ``steer_codes`` is set.

Why a second path beside the input-embedding shift: a HiMTok model with readouts (its patch or mask readout) gets
most of its code logits from terms read once from the prompt, which no input shift at a mask token can reach.
Measured on ``synthref-himtok`` (``benchmarks/steerability.py``, session 16): the readout alone had code CE 3.03
against the LM part's 5.19 (their sum 2.35), and a shift of 3x the mean embedding norm at ``<mt_start>`` moved the
decoding logits by KL 0.078 per later code. These terms act where decoding reads its codes, in the tokenizer's
geometry (codes that decode alike are steered alike), so a thought can re-aim the rest of a mask.

Fed from ``c``, not from the shift: the shift starts at zero (see :mod:`.control`), and a zero layer behind a zero
input would be a saddle with no gradient at all.
"""

from __future__ import annotations

import torch
from torch import nn


class CodeSteer(nn.Module):
    def __init__(self, dim: int, num_tokens: int, code_dim: int) -> None:
        super().__init__()
        self.num_tokens, self.code_dim = num_tokens, code_dim
        self.proj = nn.Linear(dim, num_tokens * code_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c: torch.Tensor, codebook: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """``c (N, D)``, ``codebook (V, code_dim)``, ``after (N,)`` the mask-token index of the shaped token (-1 for
        ``<mt_start>``) -> terms ``(N, K, V)`` float, zero at positions ``<= after`` (codes already chosen)."""
        u = self.proj(c.to(self.proj.weight.dtype)).float().view(-1, self.num_tokens, self.code_dim)
        later = torch.arange(self.num_tokens, device=c.device)[None] > after.to(c.device)[:, None]  # (N, K)
        return (u @ codebook.float().t()).float() * later[..., None]  # float under autocast too
