"""The ``shaper`` head: HiMTok decoding steered by latent reasoning (LatentMorph applied to mask tokens).

Everything HiMTok does stays (vocabulary, targets, constrained decoding, soft decode, ``keep_tokens``). On top, at
CHECKPOINTS of each mask span (mask-token indices ``i`` with ``(i + 1) % check_every == 0``, ``i < K - 1``: a shift
at the last code could only change ``<mt_end>``, which is forced; with ``steer_start`` also ``i = -1``, the
``<mt_start>`` token itself), an invoker decides how many shaping rounds to
run (:mod:`mmseg.modeling.shaper.invoker`). One round, in :meth:`ShaperHead.after_step`:

1. short condenser over a ring buffer of the last ``buffer_size`` last-layer hidden states -> pooled ``m``;
2. long condenser over the hidden states of the span so far (``<mt_start>`` and codes ``0..i``) plus the image
   positions of the prompt (with ``memory_text``, also every text position before the span: the request and the
   answer's words) -> memory tokens;
3. latent thought: the frozen LM over ``[think-prompt; memory]`` in a separate forward -> ``z``;
4. translator ``[z, m, p] -> c`` (``p``: the prompt's hidden states pooled, image positions excluded);
5. control shaper ``c -> shift``; the shift is added to the input embedding of mask token ``i`` and that one
   position is re-run with :meth:`~mmseg.generation.DecodeSession.replace_last` (its KV entries are replaced, the
   cache length is unchanged), so the next code and everything after it see the shaped token;
6. with ``steer_codes``, the translator's output also gives terms for the code logits of the mask tokens after the
   shaped one (:class:`~mmseg.modeling.shaper.code_steer.CodeSteer`), the lever on the share of the code logits
   that HiMTok's readouts read from the prompt, where no input shift reaches;
7. with ``mismatch_probe``, the shift and the terms are scaled by the probability, read once at ``<mt_start>``, that
   the answer's words name another object than the request (:class:`~mmseg.modeling.shaper.mismatch.MismatchProbe`).

Each answer's :class:`MaskPrediction` ``info`` reports ``invoke`` (the mode), ``invocations`` (rounds run) and
``invoked_at`` (the mask-token index of every round), and with ``mismatch_probe`` ``words_wrong`` (the probe's
probability that the answer's words name another object than the request). Per-call options: ``keep_tokens``, ``invoke`` (one of
:data:`~mmseg.modeling.shaper.invoker.INVOKE_MODES`) and ``sample_seed`` (sample the learned policy's decisions
instead of thresholding them; the decisions then come back in ``info["policy_trace"]``, which stage-2 training
reads).

Training (``mmseg train``) is the head's own: :mod:`mmseg.train_shaper` starts from the HiMTok checkpoint named by
``init_from``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F

from mmseg.modeling.heads.base import MaskPrediction, register_head
from mmseg.modeling.heads.himtok import HiMTokConfig, HiMTokHead
from mmseg.modeling.shaper.code_steer import CodeSteer
from mmseg.modeling.shaper.condenser import Condenser
from mmseg.modeling.shaper.control import ControlShaper
from mmseg.modeling.shaper.mismatch import MismatchProbe
from mmseg.modeling.shaper.invoker import (
    INVOKE_MODES,
    NUM_FEATURES,
    PolicyInvoker,
    check_invoke_mode,
    entropy_rounds,
    invoker_features,
    normalised_entropy,
)
from mmseg.modeling.shaper.thought import latent_thought
from mmseg.modeling.shaper.translator import Translator

if TYPE_CHECKING:
    from mmseg.generation import DecodeSession
    from mmseg.modeling.model import MMSegModel

STATE_KEY = "shaper"  # this head's entry in DecodeSession.state (HiMTok's own stays under "himtok")


@dataclass(frozen=True)
class ShaperConfig(HiMTokConfig):
    """Options of the ``shaper`` head: HiMTok's, plus the shaper's architecture, invocation and training.

    ``init_from``: the HiMTok checkpoint folder that ``mmseg train`` starts from (its backbone, text tokenizer,
    mask tokenizer and HiMTok options are taken over; only the shaper's parts are new). Training settings that the
    shared :class:`~mmseg.config.TrainConfig` has no place for live here, as HiMTok's loss weights do.
    """

    init_from: str | None = None
    # invocation
    invoke: str = "learned"  # default mode; a call's ``invoke`` option overrides it
    check_every: int = 4  # a checkpoint every this many mask tokens
    # Also a checkpoint at ``<mt_start>`` (index -1: the shift lands on ``<mt_start>``'s input, before any code).
    # Why: a HiMTok model trained with ``code_input_noise`` 1.0 has learned to ignore what sits at code positions,
    # so a shift there barely moves the codes after it; ``<mt_start>`` is read by every code. Measured with
    # benchmarks/steerability.py on synthref-himtok (session 14; random shift of 3x the mean embedding norm, 32
    # teacher-forced val sentences): KL per later code 0.222 and 27% of their argmaxes changed at <mt_start>,
    # against 0.012 / 3.2% at code 4's input and 0.017 / 4.6% at code 16's.
    steer_start: bool = False
    max_invocations: int = 4  # cap on shaping rounds per mask
    entropy_low: float = 0.3  # CNTP rule, on entropy normalised by log(codebook size)
    entropy_high: float = 0.8
    entropy_max_rounds: int = 2
    policy_hidden: int = 32
    policy_window: int = 4  # checkpoints in the variance feature
    # Standardise the policy's inputs by running statistics that stage 2 accumulates (see PolicyInvoker). Off: raw
    # features, as the checkpoints trained before session 32 (their weights hold no statistics).
    policy_normalize: bool = False
    # A fifth policy input: the answer's confidence, the lowest log-probability of a text token it chose before
    # <mt_start> (see mmseg.modeling.shaper.invoker.confidence_feature). Off: the four features of LatentMorph's
    # invoker adapted to mask tokens.
    policy_confidence: bool = False
    # architecture
    buffer_size: int = 8  # ring buffer of recent hidden states (short condenser)
    short_queries: int = 4
    long_queries: int = 8
    condenser_heads: int = 4
    num_controls: int = 4
    # A shaping round also adds terms to the code logits of the mask tokens after the shaped one (see
    # mmseg.modeling.shaper.code_steer): the lever on the readouts' share of the code logits, which the
    # input-embedding shift cannot reach. Off: the shift alone, as LatentMorph.
    steer_codes: bool = False
    # The long condenser's memory also holds the hidden states of every text position before the mask span: the
    # request's tokens and the answer's words (off: the image positions and the span only). Why: the masks a shaper
    # could fix are those drawn after words that name another object, and without this the shaping rounds see the
    # request only pooled into ``p`` (synthref-himtok, session 29: even an oracle invoker that shapes exactly where
    # the words are wrong gains +0.006 testB cIoU with the image-and-span memory).
    memory_text: bool = False
    # A probe on the long memory at <mt_start> (needs memory_text: it reads the request and the answer's words) says
    # how likely the words name another object than the request; every shaping round of that mask is scaled by it,
    # and it is an input of the learned invoker. Trained in stage 1 with BCE (weight ``mismatch_weight``) against the
    # frozen model's own answers (needs own_answers). See mmseg.modeling.shaper.mismatch for why.
    mismatch_probe: bool = False
    mismatch_weight: float = 1.0
    think_prompt: str = "Think again about the object and the mask so far."
    # stage 1 (teacher-forced); steps, batch and learning rate come from the preset's "train"
    shaper_ce_weight: float = 1.0  # CE on the mask tokens after the injection (the HiMTok mask loss is added)
    # Stage 1 feeds the frozen model's own code choices as the code inputs (one extra no-grad pass), so the states
    # the shaper reads are those decoding will give it. Off: the collator's inputs (random codes under HiMTok's
    # ``code_input_noise``), which no decode ever feeds. Measured (session 23, tiny-shaper with steer_codes and
    # steer_start on synthref-himtok, 27 minutes): the shaped CE fell further below the unshaped one (-0.028 against
    # -0.025 nats in the last 400-step window), and val cIoU with ``always`` ended the same (0.7185 both; never
    # 0.7333), so it stays off.
    own_code_inputs: bool = False
    # Before stage 1, the frozen model answers this many training sentences itself (invoke "never", its own words
    # before the mask); both stages then train after THOSE answers, with the true target's mask and codes as the
    # goal. Why: a shaper trained after the true answer text never meets the case it could fix, a mask drawn after
    # words that name another object (19.5% of synthref-himtok's seed-1 testB target answers, cIoU 0.265 there
    # against 0.949 where the words are right). 0: both stages force the true answer text.
    own_answers: int = 0
    # Share of both stages' draws taken from the pool's answers whose words differ from the true answer (the cases a
    # shaper could fix); 0: every answer as likely (on synthref-s2, 11% of the pool's answers differ).
    own_mismatch_share: float = 0.0
    # The same share for stage 2's draws only (None: ``own_mismatch_share``). Why apart: the invoker learns when a
    # round pays, and that depends on how often the words are wrong, so it is best learnt at the rate decoding meets
    # (0: the pool as drawn), while stage 1 may see the rare case more often to learn the fix.
    policy_mismatch_share: float | None = None
    # stage 2 (REINFORCE with a group baseline)
    policy_steps: int = 300
    policy_lr: float = 3e-3
    policy_batch: int = 8  # queries per step
    policy_group: int = 4  # sampled rollouts per query
    invoke_cost: float = 0.01  # subtracted from the reward per invocation
    policy_time_share: float = 0.3  # share of --max-minutes / train.max_minutes given to stage 2


    @property
    def policy_share(self) -> float:
        """The share of misnamed answers in stage 2's draws: ``policy_mismatch_share``, else ``own_mismatch_share``."""
        return self.own_mismatch_share if self.policy_mismatch_share is None else self.policy_mismatch_share


@dataclass
class _RowState:
    """One row's bookkeeping during generation."""

    seen: int = 0  # len(session.tokens[row]) at the previous after_step: tells whether this step fed a token
    recent: deque = field(default_factory=deque)  # ring buffer of (D,) hidden states
    context: list[torch.Tensor] = field(default_factory=list)  # memory_text: text states fed so far (prompt first)
    span_context: torch.Tensor | None = None  # memory_text: ``context`` before the open span, stacked ``(L, D)``
    min_log_prob: float = 0.0  # policy_confidence: the lowest log-probability of a text token chosen so far
    span_log_prob: float = 0.0  # policy_confidence: ``min_log_prob`` when the open span began
    wrong: float = 1.0  # mismatch_probe: the probe's probability for the open span (the rounds' scale)
    wrongs: list[float] = field(default_factory=list)  # mismatch_probe: per span
    span: list[torch.Tensor] | None = None  # hidden states of the open span: <mt_start>, then each code
    cos: list[float] = field(default_factory=list)  # cos(m, p) at each checkpoint of the open span
    invoked: list[list[int]] = field(default_factory=list)  # per span: mask-token index of each round
    trace: list[list[dict]] = field(default_factory=list)  # per span: sampled policy decisions


def pad_states(states: Sequence[Sequence[torch.Tensor] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows of ``(D,)`` states (lists, or tensors ``(N_i, D)`` already stacked) -> ``(B, N, D)`` zero-padded
    and ``(B, N)`` bool validity."""
    n = max(len(s) for s in states)
    first = states[0][0]
    out = first.new_zeros(len(states), n, first.shape[-1])
    valid = torch.zeros(len(states), n, dtype=torch.bool, device=first.device)
    for i, row in enumerate(states):
        out[i, : len(row)] = row if torch.is_tensor(row) else torch.stack(list(row))
        valid[i, : len(row)] = True
    return out, valid


def pool_prompt(hidden: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden (B, T, D)`` over the positions ``use (B, T)`` marks: ``(B, D)`` float."""
    weights = use.to(torch.float32)[..., None]
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@register_head
class ShaperHead(HiMTokHead):
    name = "shaper"
    config_cls = ShaperConfig
    option_names = ("keep_tokens", "refine_mask", "invoke", "sample_seed")

    def __init__(self, config: ShaperConfig, hidden_size: int, image_size: int, grid_size: tuple[int, int],
                 asset_dir: Path | None = None, prefix_grid: tuple[int, int] | None = None) -> None:
        check_invoke_mode(config.invoke)
        for key in ("check_every", "max_invocations", "buffer_size", "short_queries", "long_queries", "num_controls",
                    "policy_hidden", "policy_window", "policy_batch", "policy_group"):
            if getattr(config, key) < 1:
                raise ValueError(f"shaper head: {key} must be >= 1, got {getattr(config, key)}")
        if not 0.0 <= config.policy_time_share < 1.0:
            raise ValueError(f"shaper head: policy_time_share must be in [0, 1), got {config.policy_time_share}")
        if not config.think_prompt.strip():
            raise ValueError("shaper head: think_prompt is empty")
        for key in ("own_mismatch_share", "policy_mismatch_share"):
            share = getattr(config, key)
            if share is not None and not 0.0 <= share <= 1.0:
                raise ValueError(f"shaper head: {key} must be in [0, 1], got {share}")
        if config.own_answers < 0:
            raise ValueError(f"shaper head: own_answers must be >= 0, got {config.own_answers}")
        if config.mismatch_probe and not config.memory_text:
            raise ValueError("shaper head: mismatch_probe reads the request and the answer's words in the long memory; "
                             "set memory_text to true as well")
        super().__init__(config, hidden_size=hidden_size, image_size=image_size, grid_size=grid_size, asset_dir=asset_dir,
                         prefix_grid=prefix_grid)
        self.condense_short = Condenser(hidden_size, config.short_queries, config.condenser_heads)
        self.condense_long = Condenser(hidden_size, config.long_queries, config.condenser_heads)
        self.translator = Translator(hidden_size)
        self.control = ControlShaper(hidden_size, config.num_controls)
        self.code_steer = CodeSteer(hidden_size, self.num_tokens, self.mask_tokenizer.config.code_dim) \
            if config.steer_codes else None
        self.mismatch = MismatchProbe(hidden_size) if config.mismatch_probe else None
        self.policy = PolicyInvoker(config.policy_hidden,
                                    NUM_FEATURES + int(config.policy_confidence) + int(config.mismatch_probe),
                                    normalize=config.policy_normalize)

    @classmethod
    def trainer(cls) -> Callable[..., dict]:
        from mmseg.train_shaper import train_shaper

        return train_shaper

    def bind(self, processor: Any, lm: torch.nn.Module) -> None:
        super().bind(processor, lm)
        ids = processor.encode_model_text(self.config.think_prompt)
        self.register_buffer("think_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.image_token_id = processor.image_token_id

    def shaper_modules(self) -> dict[str, torch.nn.Module]:
        """The parts stage 1 trains (the policy is stage 2's)."""
        parts = {"condense_short": self.condense_short, "condense_long": self.condense_long,
                 "translator": self.translator, "control": self.control}
        if self.code_steer is not None:
            parts["code_steer"] = self.code_steer
        if self.mismatch is not None:
            parts["mismatch"] = self.mismatch
        return parts

    @property
    def has_readout(self) -> bool:
        return self.reads_prompt or self.code_steer is not None

    def checkpoints(self) -> list[int]:
        """Mask-token indices where shaping may happen (-1: at ``<mt_start>``, with ``steer_start``)."""
        every = self.config.check_every
        start = [-1] if self.config.steer_start else []
        return start + [i for i in range(self.num_tokens - 1) if (i + 1) % every == 0]

    # -- the shaping computation, shared by inference and training ------------------------------------
    def shift(self, model: "MMSegModel", recent: torch.Tensor, recent_valid: torch.Tensor, memory_states: torch.Tensor,
              memory_valid: torch.Tensor, prompt: torch.Tensor, after: torch.Tensor,
              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One shaping round for N rows -> ``(shift (N, D), code terms (N, K, V) float)``: the input-embedding
        shift, and the terms for the code logits after the shaped token (None without ``steer_codes``, see
        :class:`CodeSteer`).

        ``recent (N, R, D)`` + ``recent_valid (N, R)``: the ring buffer; ``memory_states (N, M, D)`` +
        ``memory_valid (N, M)``: what :meth:`long_memory` gathers; ``prompt (N, D)``: the pooled prompt ``p``;
        ``after (N,)``: the mask-token index of the shaped token (-1 for ``<mt_start>``); ``scale (N,)``: a factor
        on both outputs (``mismatch_probe``: the probability that the words are wrong).
        """
        m = self.condense_short.pooled(recent, recent_valid)
        memory = self.condense_long(memory_states, memory_valid)
        think = model.lm.get_input_embeddings()(self.think_ids)
        z = latent_thought(model.decoder, think, memory)
        c = self.translator(z, m, prompt)
        shift = self.control(c)
        steer = None if self.code_steer is None else self.code_steer(c, self._codebook(torch.float32), after)
        if scale is not None:
            shift = shift * scale.to(shift.dtype)[:, None]
            steer = None if steer is None else steer * scale.float()[:, None, None]
        return shift, steer

    def mismatch_logits(self, image: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, start: torch.Tensor,
                        prompt: torch.Tensor) -> torch.Tensor:
        """The mismatch probe's logits ``(N,)`` from the long memory at ``<mt_start>``: ``image (N, P, D)``, ``text
        (N, L, D)`` + ``text_valid (N, L)`` (the text positions before the span), ``start (N, D)`` (the
        ``<mt_start>`` state) and the pooled prompt ``prompt (N, D)``."""
        span_valid = torch.ones(start.shape[0], 1, dtype=torch.bool, device=start.device)
        memory, valid = self.long_memory(image, start[:, None], span_valid, text, text_valid)
        return self.mismatch(self.condense_long(memory, valid), prompt)

    def long_memory(self, image: torch.Tensor, span: torch.Tensor, span_valid: torch.Tensor,
                    text: torch.Tensor | None = None,
                    text_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The long condenser's memory ``(N, M, D)`` and its validity ``(N, M)``: ``image (N, P, D)`` (all valid),
        then, with ``memory_text``, ``text (N, L, D)`` + ``text_valid (N, L)`` (the text positions before the span),
        then ``span (N, S, D)`` + ``span_valid (N, S)``."""
        states = [image, span.to(image.dtype)]
        valid = [torch.ones(image.shape[:2], dtype=torch.bool, device=image.device), span_valid]
        if self.config.memory_text:
            if text is None or text_valid is None:
                raise ValueError("memory_text needs the text states before the span")
            states.insert(1, text.to(image.dtype))
            valid.insert(1, text_valid)
        return torch.cat(states, dim=1), torch.cat(valid, dim=1)

    def session_readout(self, session: "DecodeSession", rows: torch.Tensor, steps: list[int],
                        query: torch.Tensor | None = None) -> torch.Tensor:
        """HiMTok's readout terms plus the code terms of this session's shaping rounds so far ``(n, V)``."""
        if self.reads_prompt:
            terms = super().session_readout(session, rows, steps, query)
        else:
            terms = torch.zeros(len(steps), self.codebook_size, device=rows.device)
        steer = session.state.get(STATE_KEY, {}).get("steer")
        if steer is not None:
            index = torch.tensor([min(n, self.num_tokens - 1) for n in steps], device=rows.device)
            terms = terms + steer[rows, index]
        return terms

    def prompt_summary(self, ids: torch.Tensor, hidden: torch.Tensor,
                       prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids (B, T)``, ``hidden (B, T, D)``, ``prompt_mask (B, T)`` (real prompt positions) ->
        ``(p (B, D), image states (B, P, D))``: the pooled prompt text and the image positions' hidden states."""
        image = ids == self.image_token_id
        p = pool_prompt(hidden, prompt_mask & ~image)
        counts = image.sum(1)
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise ValueError("the shaper needs the same nonzero number of image positions in every row, got "
                             f"{counts.tolist()}")
        return p, hidden[image].view(ids.shape[0], int(counts[0]), hidden.shape[-1])

    # -- options --------------------------------------------------------------------------------------
    def invoke_mode(self, options: dict[str, Any]) -> str:
        return check_invoke_mode(options.get("invoke", self.config.invoke))

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        self.invoke_mode(options)
        seed = options.get("sample_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"sample_seed must be a whole number >= 0, got {seed!r}")

    # -- inference ------------------------------------------------------------------------------------
    def _session_state(self, session: "DecodeSession") -> dict[str, Any]:
        state = session.state.get(STATE_KEY)
        if state is not None:
            return state
        if session.prompt_hidden is None or session.prompt_ids is None:
            raise ValueError("the shaper head needs the prompt's hidden states: start the session with start_session")
        t = session.prompt_ids.shape[1]
        valid = session.cache_valid[:, :t]
        prompt, image = self.prompt_summary(session.prompt_ids, session.prompt_hidden, valid)
        text = valid & (session.prompt_ids != self.image_token_id) if self.config.memory_text else None
        rows = []
        for row in range(session.batch_size):
            states = session.prompt_hidden[row][valid[row]]
            context = list(session.prompt_hidden[row][text[row]]) if text is not None else []
            rows.append(_RowState(recent=deque(states[-self.config.buffer_size:], maxlen=self.config.buffer_size),
                                  context=context))
        seed = session.options.get("sample_seed")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=session.device).manual_seed(int(seed))
        state = {"rows": rows, "prompt": prompt, "image": image, "generator": generator,
                 "mode": self.invoke_mode(session.options)}
        session.state[STATE_KEY] = state
        return state

    def after_step(self, session: "DecodeSession", hidden: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Book-keeping for every fed token; shaping rounds at checkpoints. ``hidden (B, 1, D)`` -> ``(B, 1, D)``."""
        if self.invoke_mode(session.options) == "never":
            return hidden  # plain HiMTok: not even the bookkeeping, so "never" costs nothing
        state = self._session_state(session)
        rows: list[_RowState] = state["rows"]
        candidates: list[int] = []  # rows at a checkpoint with invocations left
        opened: list[int] = []  # rows that fed <mt_start> this step
        checkpoints = set(self.checkpoints())
        if self.config.policy_confidence and self.invoke_mode(session.options) == "learned":
            self._track_confidence(session, rows)
        for r, row in enumerate(rows):
            tokens = session.tokens[r]
            if len(tokens) == row.seen:  # nothing fed for this row (finished, or its eos)
                continue
            row.seen = len(tokens)
            h = hidden[r, -1]
            row.recent.append(h)
            token = tokens[-1]
            if self.config.memory_text:  # every fed token, as in a teacher-forced pass: positions before the span
                if token == self.mt_start_id:  # stacked once per mask: every round of it reads the same context
                    row.span_context = torch.stack(row.context)
                row.context.append(h)
            if token == self.mt_start_id:
                row.span, row.cos, row.span_log_prob = [h], [], row.min_log_prob
                opened.append(r)
                row.invoked.append([])
                row.trace.append([])
                if -1 in checkpoints:  # steer_start: <mt_start> itself is a checkpoint
                    candidates.append(r)
            elif row.span is not None and token in self._code_of and len(row.span) <= self.num_tokens:
                row.span.append(h)
                if len(row.span) - 2 in checkpoints and len(row.invoked[-1]) < self.config.max_invocations:
                    candidates.append(r)
            else:
                row.span = None
        if self.mismatch is not None and opened:  # the probe reads each mask's memory once, at its <mt_start>
            index = torch.tensor(opened, device=hidden.device)
            text, text_valid = pad_states([rows[r].span_context for r in opened])
            logits = self.mismatch_logits(state["image"][index], text, text_valid, hidden[index, -1],
                                          state["prompt"][index])
            for r, p in zip(opened, torch.sigmoid(logits).tolist()):
                rows[r].wrong = p
                rows[r].wrongs.append(p)
        if not candidates:
            return hidden
        rounds = self._rounds(session, state, candidates, hidden)
        embeds = session.model.lm.get_input_embeddings()(chosen)[:, None]  # (B, 1, D): the tokens just fed
        hidden = hidden.clone()
        for round_index in range(max(rounds, default=0)):
            active = [r for r, n in zip(candidates, rounds) if n > round_index]
            recent, recent_valid = pad_states([rows[r].recent for r in active])
            span, span_valid = pad_states([rows[r].span for r in active])
            index = torch.tensor(active, device=hidden.device)
            text = text_valid = None
            if self.config.memory_text:
                text, text_valid = pad_states([rows[r].span_context for r in active])
            memory, memory_valid = self.long_memory(state["image"][index], span, span_valid, text, text_valid)
            after = torch.tensor([len(rows[r].span) - 2 for r in active], device=hidden.device)
            scale = None
            if self.mismatch is not None:
                scale = torch.tensor([rows[r].wrong for r in active], device=hidden.device)
            shift, steer = self.shift(session.model, recent, recent_valid, memory, memory_valid, state["prompt"][index],
                                      after, scale)
            if steer is not None:  # read by constrain (session_readout)
                if "steer" not in state:
                    state["steer"] = torch.zeros(session.batch_size, self.num_tokens, self.codebook_size,
                                                 device=hidden.device)
                # The latest round's terms REPLACE earlier ones (codes up to the shaped token are chosen already):
                # stage 1 trains one round at a time, and summed rounds would push the later codes further than
                # any round was trained to.
                state["steer"][index] = steer.to(state["steer"].dtype)
            shifted = embeds.clone()
            shifted[index, 0] = shifted[index, 0] + shift.to(shifted.dtype)
            embeds = shifted  # a further round shifts the already shaped token again
            new = session.replace_last(embeds)
            hidden[index] = new[index].to(hidden.dtype)
            for r in active:
                rows[r].recent[-1] = hidden[r, -1]
                rows[r].span[-1] = hidden[r, -1]
                if self.config.memory_text:
                    rows[r].context[-1] = hidden[r, -1]
                rows[r].invoked[-1].append(len(rows[r].span) - 2)
        return hidden

    def _track_confidence(self, session: "DecodeSession", rows: list[_RowState]) -> None:
        """``policy_confidence``: fold the log-probability of each text token fed this step into its row's running
        minimum. The distribution that chose it is the LM's at the previous position, whose state is the ring
        buffer's newest entry (the prompt's last state for the answer's first token); a code or span marker is
        not a word of the answer and is skipped."""
        fed = [r for r, row in enumerate(rows) if len(session.tokens[r]) != row.seen]
        fed = [r for r in fed if rows[r].span is None and session.tokens[r][-1] not in self._code_of
               and session.tokens[r][-1] not in (self.mt_start_id, self.mt_end_id)]
        if not fed:
            return
        previous = torch.stack([rows[r].recent[-1] for r in fed])
        log_probs = torch.log_softmax(session.model.lm.get_output_embeddings()(previous).float(), dim=-1)
        chosen = torch.tensor([session.tokens[r][-1] for r in fed], device=log_probs.device)
        for r, value in zip(fed, log_probs.gather(1, chosen[:, None])[:, 0].tolist()):
            rows[r].min_log_prob = min(rows[r].min_log_prob, value)

    def _checkpoint_readout(self, session: "DecodeSession", candidates: list[int], steps: list[int],
                            hidden: torch.Tensor) -> torch.Tensor:
        """The readout's terms ``(n, V)`` at the candidates' checkpoints. A row that has just fed ``<mt_start>``
        (``steer_start``) has no recorded mask-point state yet: its query is the state just computed, ``hidden (B,
        1, D)``, and that read is not kept (see :meth:`HiMTokHead.session_readout`)."""
        opening = [session.tokens[r][-1] == self.mt_start_id for r in candidates]
        terms = torch.zeros(len(candidates), self.codebook_size, device=hidden.device)
        for fresh in (True, False):
            group = [i for i, o in enumerate(opening) if o == fresh]
            if group:
                rows = torch.tensor([candidates[i] for i in group], device=hidden.device)
                query = hidden[rows, -1] if fresh else None
                terms[group] = self.session_readout(session, rows, [steps[i] for i in group], query).float()
        return terms

    def _rounds(self, session: "DecodeSession", state: dict[str, Any], candidates: list[int],
                hidden: torch.Tensor) -> list[int]:
        """Shaping rounds per candidate row, by the session's invoke mode, within the cap."""
        rows: list[_RowState] = state["rows"]
        mode = state["mode"]
        left = [self.config.max_invocations - len(rows[r].invoked[-1]) for r in candidates]
        if mode == "always":
            return [min(1, n) for n in left]
        index = torch.tensor(candidates, device=hidden.device)
        code_logits = session.model.lm.get_output_embeddings()(hidden[index, -1]).index_select(-1, self.code_token_ids)
        if self.has_readout:  # the logits decoding will read (see HiMTokHead.constrain)
            steps = [self._open_span(session.tokens[r]) for r in candidates]
            code_logits = code_logits.float() + self._checkpoint_readout(session, candidates, steps, hidden)
        entropy = normalised_entropy(code_logits)  # of the NEXT mask token's distribution
        if mode == "entropy":
            wanted = entropy_rounds(entropy, self.config.entropy_low, self.config.entropy_high,
                                    self.config.entropy_max_rounds).tolist()
            return [min(w, n) for w, n in zip(wanted, left)]
        recent, recent_valid = pad_states([rows[r].recent for r in candidates])
        m = self.condense_short.pooled(recent, recent_valid)
        cos = F.cosine_similarity(m.float(), state["prompt"][index].float(), dim=-1)
        features = []
        for i, r in enumerate(candidates):
            rows[r].cos.append(float(cos[i]))
            confidence = rows[r].span_log_prob if self.config.policy_confidence else None
            wrong = rows[r].wrong if self.mismatch is not None else None
            features.append(invoker_features(rows[r].cos, float(entropy[i]), self.config.policy_window, confidence,
                                             wrong))
        features_t = torch.stack(features).to(hidden.device)
        decisions = self.policy.decide(features_t, state["generator"]).tolist()
        if state["generator"] is not None:
            for r, f, d in zip(candidates, features, decisions):
                rows[r].trace[-1].append({"index": len(rows[r].span) - 2, "features": f.tolist(), "invoke": bool(d)})
        return [int(d) for d in decisions]

    def decode(self, session: "DecodeSession") -> list[list[MaskPrediction]]:
        """HiMTok's decode, with each mask's invocation record added to its ``info``."""
        results = super().decode(session)
        mode = self.invoke_mode(session.options)
        state = session.state.get(STATE_KEY)
        for r, predictions in enumerate(results):
            row = state["rows"][r] if state is not None else None
            for j, prediction in enumerate(predictions):
                invoked = row.invoked[j] if row is not None and j < len(row.invoked) else []
                prediction.info.update({"invoke": mode, "invocations": len(invoked), "invoked_at": list(invoked)})
                if row is not None and j < len(row.wrongs):  # mismatch_probe: how likely the words name another object
                    prediction.info["words_wrong"] = round(row.wrongs[j], 4)
                if state is not None and state["generator"] is not None:
                    prediction.info["policy_trace"] = list(row.trace[j]) if j < len(row.trace) else []
        return results


def shaper_from_himtok(model: "MMSegModel", processor: Any, options: dict[str, Any] | None = None,
                       asset_dir: Path | None = None) -> "MMSegModel":
    """A shaper model on a HiMTok model's parts: the SAME vision tower, projector and LM objects (no copy), a new
    shaper head with the HiMTok head's options plus ``options``. ``asset_dir``: a checkpoint folder holding the
    mask tokenizer (else the head's ``tokenizer`` path is used)."""
    from mmseg.modeling.heads.base import build_head
    from mmseg.modeling.model import MMSegModel

    if model.head.name != "himtok":
        raise ValueError(f"the shaper starts from a himtok model, got a {model.head.name!r} model")
    merged = {**model.head.options(), **dict(options or {}), "name": ShaperHead.name}
    hidden = model.lm.config.get_text_config().hidden_size
    head = build_head(merged, hidden_size=hidden, image_size=model.vision.image_size, grid_size=model.vision.grid_size,
                      asset_dir=asset_dir, prefix_grid=model.prefix_grid)
    model.unhook()  # the new model re-adds the grounder's hook, the new head the adapter's (same weights, below)
    head.bind(processor, model.lm)
    # the HiMTok head's own learned parts, when it has them
    for part in ("adapter", "readout", "mask_readout", "answer_gate", "queries", "refiner"):
        if getattr(model.head, part) is not None:
            getattr(head, part).load_state_dict(getattr(model.head, part).state_dict())
    config = dataclasses.replace(model.config, head=merged)
    # The grounder and probe come along: a gated backbone without its gate would be another model (and its
    # checkpoint would not load).
    shaper = MMSegModel(config, model.vision, model.projector, model.lm, head, model.image_token_id, merger=model.merger,
                        probe=model.probe, grounder=model.grounder)
    return shaper.to(model.device)


__all__ = ["INVOKE_MODES", "ShaperConfig", "ShaperHead", "shaper_from_himtok"]
