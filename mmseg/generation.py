"""One batched greedy decode loop with a KV cache that hands off to the mask head.

Rows are left-padded; every forward gets an explicit 4D boolean attention mask (True = may attend) and explicit
position ids, so padding never shifts positions and no row is ever fully blocked (SDPA returns NaN for those).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from mmseg.modeling.heads.base import MaskPrediction
from mmseg.modeling.model import MMSegModel, open_image_block


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@dataclass
class DecodeSession:
    """The live state of one batched generation, as a head sees it.

    ``cache_valid (B, L)``: which cache slots hold real tokens (False for left padding and for steps fed to
    rows that had already finished). ``cache_positions (B, L)``: the position id of each slot.
    ``mask_points[b]``: cache indices of the tokens that opened a mask point in row ``b`` (the head's
    ``mask_point_token_id``, ``<seg>`` by default). ``state``: scratch space a head keeps between its calls
    (e.g. HiMTok's per-step code probabilities), keyed by the head. ``prompt_ids (B, T)`` and
    ``prompt_hidden (B, T, D)``: the left-padded prompts and their last-layer hidden states from the prefill (the
    first ``T`` cache slots; ``cache_valid[:, :T]`` marks the real ones), for heads that read the query's context
    (e.g. the shaper pools the prompt and reads the image positions).
    """

    model: MMSegModel
    cache: object
    image_features: torch.Tensor  # (B, P, D)
    pixel_values: torch.Tensor  # (B, 3, S, S)
    cache_valid: torch.Tensor
    cache_positions: torch.Tensor
    tokens: list[list[int]] = field(default_factory=list)
    mask_points: list[list[int]] = field(default_factory=list)
    point_hidden: list[list[torch.Tensor]] = field(default_factory=list)  # last hidden state at each mask point
    options: dict = field(default_factory=dict)  # per-call head options, e.g. keep_tokens
    state: dict = field(default_factory=dict)  # per-head generation state
    prompt_ids: torch.Tensor | None = None  # (B, T) left-padded prompt ids
    prompt_hidden: torch.Tensor | None = None  # (B, T, D) their last-layer hidden states

    @property
    def batch_size(self) -> int:
        return self.cache_valid.shape[0]

    @property
    def device(self) -> torch.device:
        return self.cache_valid.device

    @property
    def cache_length(self) -> int:
        return self.cache_valid.shape[1]

    def positions_of(self, cache_index: torch.Tensor) -> torch.Tensor:
        """``(B,)`` cache indices -> their ``(B,)`` position ids."""
        return self.cache_positions.gather(1, cache_index[:, None])[:, 0]

    def feed(self, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
             image_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``embeds (B, n, D)`` to the cache, causal among themselves (image positions see each other when the
        model's ``image_attention`` is "bidirectional"); returns hidden ``(B, n, D)``.
        ``image_positions (B, n)`` bool marks image tokens among them (the prompt's)."""
        n = embeds.shape[1]
        new = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()[None] & valid[:, None, :]
        new = new | torch.eye(n, dtype=torch.bool, device=self.device)[None]
        if image_positions is not None and self.model.bidirectional_image:
            new = open_image_block(new, image_positions)
        old = self.cache_valid[:, None, :].expand(-1, n, -1)
        hidden = self._run(embeds, torch.cat([old, new], dim=-1)[:, None], positions, image_positions)
        self.cache_valid = torch.cat([self.cache_valid, valid], dim=1)
        self.cache_positions = torch.cat([self.cache_positions, positions], dim=1)
        return hidden

    def replace_last(self, embeds: torch.Tensor) -> torch.Tensor:
        """Re-run the LAST cache slot with new input ``embeds (B, 1, D)`` (same position, same validity): its KV
        entries are overwritten and the cache length is unchanged. Returns its new hidden state ``(B, 1, D)``.
        For heads that steer a token after it was fed (see :meth:`MaskHead.after_step`)."""
        valid, positions = self.cache_valid[:, -1:], self.cache_positions[:, -1:]
        self.cache.crop(-1)
        self.cache_valid, self.cache_positions = self.cache_valid[:, :-1], self.cache_positions[:, :-1]
        return self.feed(embeds, positions, valid)

    def run_extra(self, embeds: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run positions that must not stay in the cache (e.g. STAMP's mask queries): ``attention (B, 1, Q, L+Q)``.
        The cache is cropped back to its previous length afterwards. Returns hidden ``(B, Q, D)``."""
        q = embeds.shape[1]
        hidden = self._run(embeds, attention, positions)
        self.cache.crop(-q)
        return hidden

    def _run(self, embeds: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
             image_positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.run_decoder(embeds.to(self.model.lm.dtype), attention, positions, use_cache=True,
                                      image_positions=image_positions, **{_cache_argument(self.model.decoder): self.cache})


def _cache_argument(decoder: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@dataclass
class Generation:
    """What :func:`generate` returns: per-row answer token ids, per-row masks and stage timings (ms)."""

    tokens: list[list[int]]
    masks: list[list[MaskPrediction]]
    timings: dict[str, float]
    text_tokens: list[list[int]] = field(default_factory=list)  # tokens as the answer text shows them (<seg>)


def start_session(model: MMSegModel, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor, *, pad_token_id: int,
                  features: torch.Tensor | None = None, options: dict | None = None) -> tuple[DecodeSession, torch.Tensor]:
    """Left-pad ``prompts`` (token ids with ``<image>`` expanded), run them through the LM into a fresh KV cache.

    Returns the session and the last-layer hidden states of the prompts ``(B, T, D)``.
    """
    from transformers import DynamicCache

    device = model.device
    b = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros(b, width, dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(list(prompt), device=device)
        valid[i, width - len(prompt):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    pixel_values = pixel_values.to(device)
    embeds, features = model.embed_inputs(input_ids, pixel_values=None if features is not None else pixel_values,
                                          features=features)
    session = DecodeSession(
        model=model, cache=DynamicCache(config=model.lm.config), image_features=features, pixel_values=pixel_values,
        cache_valid=torch.zeros(b, 0, dtype=torch.bool, device=device),
        cache_positions=torch.zeros(b, 0, dtype=torch.long, device=device),
        tokens=[[] for _ in range(b)], mask_points=[[] for _ in range(b)], point_hidden=[[] for _ in range(b)],
        options=dict(options or {}), prompt_ids=input_ids,
    )
    session.prompt_hidden = session.feed(embeds, positions, valid, image_positions=input_ids == model.image_token_id)
    return session, session.prompt_hidden


def answer_prefix_ids(processor, answer: str, mask_point_token_id: int) -> list[int]:
    """A target ``answer`` (text with ``<seg>``, e.g. "Sure, the red circle on the left <seg>.") as ids up to and
    including the head's mask-point token: one row of :func:`generate`'s ``answer_prefix``."""
    ids = processor.encode_model_text(answer)
    return ids[: ids.index(processor.seg_token_id)] + [mask_point_token_id]


@torch.inference_mode()
def generate(model: MMSegModel, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor, *, eos_token_id: int,
             pad_token_id: int, mask_token_id: int | None = None, max_new_tokens: int = 48,
             options: dict | None = None, answer_prefix: Sequence[Sequence[int]] | None = None) -> Generation:
    """Greedy decoding of a batch of prompts (token ids with ``<image>`` already expanded).

    A mask point opens where a row emits the head's ``mask_point_token_id`` (``mask_token_id`` overrides it;
    leave it None so that nothing outside the head needs to know which head runs). Each row generates up to
    ``max_new_tokens`` text tokens (steps the head dictates inside a mask span do not count) or to ``eos``;
    then the head decodes every mask point. ``options`` go to the head (e.g. ``keep_tokens``).

    ``answer_prefix`` (one id list per row, optional) forces the first tokens of each answer, e.g. a target answer
    up to its mask point, so that a head's mask decoding can be studied or trained given the text (the shaper's
    policy training does). Forced steps are otherwise ordinary: the head's ``constrain`` and ``after_step`` see them.
    """
    head = model.head
    options = dict(options or {})
    head.check_options(options)
    if answer_prefix is not None and len(answer_prefix) != len(prompts):
        raise ValueError(f"{len(answer_prefix)} answer prefixes for {len(prompts)} prompts")
    if mask_token_id is None:
        mask_token_id = head.mask_point_token_id
    timings: dict[str, float] = {}
    start = time.perf_counter()
    features = model.image_features(pixel_values.to(model.device))
    timings["vision_ms"] = _ms(start)

    start = time.perf_counter()
    session, hidden = start_session(model, prompts, pixel_values, pad_token_id=pad_token_id, features=features,
                                    options=options)
    output_layer: nn.Module = model.lm.get_output_embeddings()
    embed_layer: nn.Module = model.lm.get_input_embeddings()
    logits = output_layer(hidden[:, -1]).float()
    timings["prefill_ms"] = _ms(start)

    start = time.perf_counter()
    b = session.batch_size
    next_pos = session.cache_positions[:, -1] + 1
    finished = torch.zeros(b, dtype=torch.bool, device=session.device)
    used = torch.zeros(b, dtype=torch.long, device=session.device)  # text tokens spent per row
    while max_new_tokens > 0:
        dictated = head.in_mask_span(session)
        logits = head.constrain(session, logits)
        chosen = logits.argmax(-1)
        if answer_prefix is not None:
            for row, prefix in enumerate(answer_prefix):
                if len(session.tokens[row]) < len(prefix):
                    chosen[row] = prefix[len(session.tokens[row])]
        chosen = torch.where(finished, torch.full_like(chosen, pad_token_id), chosen)
        alive = ~finished
        opened: list[int] = []
        for row in alive.nonzero()[:, 0].tolist():
            token = int(chosen[row])
            if token != eos_token_id:
                session.tokens[row].append(token)
            if token == mask_token_id:
                session.mask_points[row].append(session.cache_length)  # the slot this token is about to take
                opened.append(row)
        used = used + (alive & ~dictated).long()
        finished = finished | (chosen == eos_token_id) | (used >= max_new_tokens)
        if bool(finished.all()) and not opened:
            break
        # A token that opens a mask point is always fed, even as a row's last one: heads read its cache slot.
        hidden = session.feed(embed_layer(chosen)[:, None], next_pos[:, None], alive[:, None])
        hidden = head.after_step(session, hidden, chosen)
        for row in opened:
            session.point_hidden[row].append(hidden[row, -1])
        if bool(finished.all()):
            break
        next_pos = next_pos + 1
        logits = output_layer(hidden[:, -1]).float()
    timings["text_ms"] = _ms(start)

    start = time.perf_counter()
    masks = head.decode(session)
    timings["mask_ms"] = _ms(start)
    return Generation(session.tokens, masks, timings, [head.answer_tokens(t) for t in session.tokens])
