"""Invoker: whether (and how many times) to shape at a checkpoint of the mask-token stream.

Modes (config ``invoke``, or per call ``segmenter(image, query, invoke=...)``):

- ``never``   plain HiMTok decoding;
- ``always``  one shaping round at every checkpoint (up to the cap);
- ``entropy`` the training-free rule of Cautious Next Token Prediction: effort grows linearly with the entropy
  ``H`` (normalised to [0, 1] by ``log V``) of the next mask-token distribution,
  ``n = 1 + (n_max - 1) * clamp((H - H_low) / (H_high - H_low), 0, 1)``; we run ``round(n) - 1`` shaping rounds,
  so a confident step is left alone and an uncertain one is reshaped up to ``n_max - 1`` times;
- ``learned`` a tiny policy MLP ``4 -> hidden -> 1`` over ``[cos(m, p), its change since the previous checkpoint,
  its variance over the last few checkpoints, H]`` gives a Bernoulli probability of invoking; it is sampled during
  stage-2 training (and when a call passes ``sample_seed``), thresholded at 0.5 otherwise so answers are
  reproducible. With the head's ``policy_confidence`` a fifth input, the answer's confidence: the lowest
  log-probability of a text token the answer chose before ``<mt_start>`` (:func:`confidence_feature`).

Every mode respects the cap on invocations per mask. Stage 2 trains the policy with REINFORCE against a group
baseline (:func:`group_advantages`, :func:`reinforce_loss`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INVOKE_MODES = ("never", "always", "entropy", "learned")
NUM_FEATURES = 4  # without the answer's confidence
CONFIDENCE_FLOOR = -10.0  # log-probabilities below this are clipped: the feature lies in [-1, 0]


def check_invoke_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`INVOKE_MODES`, else a ValueError naming the valid ones."""
    if not isinstance(mode, str) or mode not in INVOKE_MODES:
        raise ValueError(f"unknown invoke mode {mode!r}; valid: {', '.join(INVOKE_MODES)}")
    return mode


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim divided by ``log V``: ``(..., V) -> (...)`` in [0, 1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy / math.log(max(2, logits.shape[-1]))


def entropy_rounds(entropy: torch.Tensor, low: float, high: float, max_rounds: int) -> torch.Tensor:
    """The CNTP effort rule: normalised ``entropy (B,)`` -> shaping rounds ``(B,)`` long in ``0 .. max_rounds``
    (``n_max = max_rounds + 1`` in the paper's formula)."""
    scale = ((entropy - low) / max(high - low, 1e-6)).clamp(0.0, 1.0)
    effort = 1.0 + max_rounds * scale  # n in [1, n_max]
    return (effort.round() - 1).long()


def confidence_feature(min_log_prob: float) -> float:
    """The answer's lowest chosen-token log-probability -> ``min_log_prob / 10`` clipped to ``[-1, 0]``.

    Why it is a feature: on synthref-himtok (session 29, seed-1 testB) it tells answers that name another object
    than the request's from the rest with AUROC 0.86, and those are the masks a shaping round could fix; the
    other four features do not separate them.
    """
    return max(min_log_prob, CONFIDENCE_FLOOR) / -CONFIDENCE_FLOOR


def invoker_features(cos_history: Sequence[float], entropy: float, window: int,
                     confidence: float | None = None, wrong: float | None = None) -> torch.Tensor:
    """The policy's input ``(4,)`` from this mask's ``cos(m, p)`` at each checkpoint so far (current last) and the
    current normalised entropy: ``[cos, cos - previous cos (0 at the first), variance over the last window, H]``;
    then, when given, the answer's lowest chosen-token log-probability ``confidence`` (see
    :func:`confidence_feature`) and the mismatch probe's probability ``wrong`` that the words name another object
    (see :mod:`mmseg.modeling.shaper.mismatch`)."""
    current = cos_history[-1]
    delta = current - cos_history[-2] if len(cos_history) > 1 else 0.0
    recent = torch.tensor(list(cos_history[-window:]), dtype=torch.float32)
    variance = float(recent.var(unbiased=False)) if len(recent) > 1 else 0.0
    values = [current, delta, variance, entropy]
    if confidence is not None:
        values.append(confidence_feature(confidence))
    if wrong is not None:
        values.append(wrong)
    return torch.tensor(values, dtype=torch.float32)


class PolicyInvoker(nn.Module):
    """Bernoulli policy ``features (N, F) -> logits (N,)`` of invoking (``F`` = ``num_features``, 4 to 6). The last
    layer starts at zero, so an untrained policy invokes with probability 0.5 everywhere (maximal exploration for
    stage 2).

    With ``normalize`` the features are standardised by running means and variances that stage 2 accumulates
    (:meth:`observe`; decoding only reads them), as RL implementations normalise observations. Why: the features
    live on scales three orders of magnitude apart (synthref-himtok, session 32, 1,061 testB decisions: the cosine
    0.04 +- 0.03, its variance 2e-4 +- 3e-4, the confidence -0.015 +- 0.02, the entropy 0.57 +- 0.18, the mismatch
    probe 0.49 +- 0.36), and 600 REINFORCE steps moved the policy along the two wide ones only."""

    def __init__(self, hidden: int = 32, num_features: int = NUM_FEATURES, normalize: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.normalize = normalize
        if normalize:  # identity until the first observe(); saved with the weights
            self.register_buffer("feature_count", torch.zeros((), dtype=torch.float64))
            self.register_buffer("feature_mean", torch.zeros(num_features, dtype=torch.float64))
            self.register_buffer("feature_m2", torch.zeros(num_features, dtype=torch.float64))

    @torch.no_grad()
    def observe(self, features: torch.Tensor) -> None:
        """Merge a batch of ``features (M, F)`` into the running statistics (Chan et al.'s parallel update: exact
        for any batch sizes). No-op without ``normalize``."""
        if not self.normalize or features.shape[0] == 0:
            return
        x = features.to(self.feature_mean.device, torch.float64)
        n, mean = float(x.shape[0]), x.mean(0)
        m2 = ((x - mean) ** 2).sum(0)
        total = self.feature_count + n
        delta = mean - self.feature_mean
        self.feature_mean += delta * (n / total)
        self.feature_m2 += m2 + delta ** 2 * self.feature_count * n / total
        self.feature_count.copy_(total)

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        """``features (N, F)`` standardised by the running statistics (unchanged before any observe(), or without
        ``normalize``); a feature that never varied is only centred."""
        if not self.normalize or float(self.feature_count) < 2:
            return features
        std = (self.feature_m2 / (self.feature_count - 1)).sqrt()
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        return ((features.double() - self.feature_mean) / std).to(features.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.standardized(features.float()).to(self.mlp[0].weight.dtype)).squeeze(-1)

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(features).float())

    def log_prob(self, features: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``log pi(action | features)`` per row, ``(N,)``; ``actions (N,)`` in {0, 1}."""
        return -F.binary_cross_entropy_with_logits(self.forward(features).float(), actions.float(), reduction="none")

    def decide(self, features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(N,)`` bool: sampled with ``generator`` when one is given, else invoke where the probability > 0.5."""
        p = self.probability(features)
        if generator is None:
            return p > 0.5
        return torch.rand(p.shape, generator=generator, device=generator.device).to(p.device) < p


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards (N, G)`` (G rollouts of each of N queries) -> advantages ``(N, G)``: reward minus its group's mean
    (the REINFORCE baseline that needs no value network)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def reinforce_loss(policy: PolicyInvoker, features: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
                   rollouts: int) -> torch.Tensor:
    """Policy-gradient loss: ``-sum_t A(rollout of t) * log pi(a_t | s_t) / rollouts``.

    ``features (M, 4)``, ``actions (M,)`` and ``advantages (M,)`` hold every decision of every rollout (each decision
    carries its rollout's advantage); dividing by the number of ``rollouts`` (not decisions) keeps a rollout with
    many checkpoints from outweighing one with few.
    """
    if features.shape[0] == 0:
        return sum(p.sum() for p in policy.parameters()) * 0.0  # keeps DDP's gradient hooks firing on every rank
    return -(advantages.float() * policy.log_prob(features, actions)).sum() / max(1, rollouts)
