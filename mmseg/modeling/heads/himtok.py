"""HiMTok: a mask spoken as hierarchical discrete tokens in the answer text.

A frozen HiMT mask tokenizer (:mod:`mmseg.modeling.mask_tokenizer`) turns a mask into ``K`` (32) code ids, early
ones coarse, later ones fine. The LM learns to say them: ``<seg>`` in an answer is realised as ::

    <mt_start> <mt_0417> <mt_0012> ... (K code tokens) <mt_end>

Vocabulary: ``<mt_start>``, ``<mt_end>`` and one token per codebook entry (``<mt_0000>`` .. ``<mt_1023>``).
With a pretrained LM, the builder's resize starts the new input AND output rows at the mean of the existing
rows (transformers' mean resizing), so the new tokens begin as "average" tokens, not random outliers; a tiny
LM built from scratch has no pretrained rows to average and starts every row at random.

Training (``expand_targets`` + ``loss``): the codes of the ground-truth mask stand in for ``<seg>`` and are
trained by the shared text cross-entropy. The hierarchical mask loss adds: soft codes
``softmax(soft_temperature * logits restricted to the codes)`` at the K positions that predict them, decoded
by the frozen tokenizer decoder (differentiable w.r.t. the LM logits) and compared with the target
(BCE + ``dice_weight`` Dice); plus ``num_prefixes`` prefix lengths ``k`` per mask, drawn with
``p(k) ~ 1 / (k + prefix_offset)``, decoded from the first ``k`` codes only and compared with a Gaussian-blurred
target (blur shrinking as ``k`` grows). Every sampled prefix contributes (their mean); the reference code
kept only the last one.

Inference: once the model emits ``<mt_start>``, :meth:`HiMTokHead.constrain` restricts the next K steps to the
code tokens and then forces ``<mt_end>``; outside a span, code tokens and ``<mt_end>`` are forbidden. Every
constrained step records its code distribution in ``session.state``; :meth:`HiMTokHead.decode` decodes those
soft codes (``keep_tokens=k`` from the call's options: the first k only, a coarser mask). Span steps do not
count toward ``max_new_tokens`` (:meth:`HiMTokHead.in_mask_span`), so a mask is never cut short.

Mask tokenizer location: a checkpoint keeps it in ``<checkpoint>/mask_tokenizer/``; a preset names it in
``head.tokenizer`` (a relative path resolves against the CURRENT directory, like any command-line path).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmseg.data.cache import BudgetMemo
from mmseg.masks import mask_digest
from mmseg.modeling.heads.base import ExtraInputs, MaskHead, MaskPrediction, register_head
from mmseg.modeling.heads.mask_queries import MaskQueries, query_training_inputs, run_mask_queries
from mmseg.modeling.losses import bce_loss, dice_loss, downsample_targets, gaussian_blur
from mmseg.modeling.mask_tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from mmseg.modeling.mask_tokenizer import MaskTokenizer, MaskTokenizerConfig

if TYPE_CHECKING:
    from mmseg.generation import DecodeSession

MT_START = "<mt_start>"
MT_END = "<mt_end>"
TOKENIZER_DIR = "mask_tokenizer"  # the mask tokenizer's folder inside a checkpoint
STATE_KEY = "himtok"  # this head's entry in DecodeSession.state
READOUT_KEY = "himtok_readout"  # the patch readout's per-session terms in DecodeSession.state
TRAIN_COMMAND = "mmseg train-tokenizer --data DATA_ROOT --out {folder}"
_CODE_TOKEN = re.compile(r"^<mt_(\d+)>$")


@dataclass(frozen=True)
class HiMTokConfig:
    """Options of the ``himtok`` head.

    ``codebook_size``, ``num_tokens`` and ``code_dim`` may stay None in a preset: they are read from the mask
    tokenizer and written into a saved checkpoint's config, so a checkpoint whose tokenizer was swapped for an
    incompatible one fails to load with a clear message.
    """

    tokenizer: str | None = None  # mask tokenizer folder; relative paths resolve against the current directory
    codebook_size: int | None = None
    num_tokens: int | None = None
    code_dim: int | None = None
    mask_loss_weight: float = 1.0
    dice_weight: float = 0.25
    soft_temperature: float = 2.0  # soft codes = softmax(soft_temperature * code logits), as HiMTok
    num_prefixes: int = 2  # prefix lengths k < K sampled per mask for the hierarchical loss
    prefix_weight: float = 1.0  # weight of the mean prefix term relative to the full-mask term
    prefix_offset: float = 9.0  # p(k) ~ 1 / (k + prefix_offset): short prefixes drawn more often
    prefix_blur: float = 0.08  # target blur sigma at k = 1, as a fraction of the tokenizer's mask side
    # At most this many masks per batch get the decoded mask loss (a random subset; None = all). Decoding through
    # the frozen tokenizer costs about as much as the LM itself on a CPU; the code-token CE trains every row.
    # tiny-himtok: 16 of its batch of 64 (59.5 -> 84.1 samples/s of compute with ``image_merge`` 2, session 20).
    # 8 (with ``prefix_samples`` 4): 1.13x the compute speed in a probe, 3,811 steps against 3,210 in 60 minutes,
    # seed-1 val cIoU 0.783 against 0.765, but testB 0.600 against 0.632 with 31 of 41 testB refusals (session 24):
    # not adopted.
    mask_loss_samples: int | None = None
    # At most this many of those masks (a random subset; None = all) also get the ``num_prefixes`` prefix decodes.
    # Why: each prefix is one more tokenizer decode per mask; with every mask decoded 1 + 2 times, the decodes took
    # ~45% of a tiny-himtok step on this CPU (96 decodes: 318 ms forward + backward against ~390 ms for the rest).
    prefix_samples: int | None = None
    # Give the code tokens the codebook's geometry (see CodebookAdapter): their input embeddings gain
    # ``A c_j`` and their logits ``<B h, c_j>``, with ``c_j`` the frozen tokenizer's normalised code vectors, so
    # codes that decode alike are read and predicted alike from the first step. Off: free rows only, as HiMTok.
    codebook_adapter: bool = False
    # Training only: this share of the code tokens in an answer's INPUT is swapped for random codes (their labels stay
    # true), so that the LM learns to predict the next code from the image and the request rather than by continuing
    # the previous codes, which are exact when teacher-forced and wrong in free decoding (exposure bias). The trainer
    # keys the swaps by step and sample, like everything else in a batch. Measured (session 10, 20-minute CPU
    # fine-tunes of the GPU-trained synthref-himtok; seed-1 val / testB cIoU with its own answers): 0.0 -> 0.358 /
    # 0.189, 0.3 -> 0.378 / 0.231, 0.6 -> 0.412 / 0.260, 1.0 -> 0.441 / 0.289. At 1.0 the codes are predicted from
    # the context alone and teacher-forced and free decoding agree (mean IoU 0.540 / 0.533; at 0.0, 0.743 / 0.391).
    code_input_noise: float = 0.0
    # Add a dense read of the image positions to the code logits (see PatchReadout): code position i's logit for
    # code j gains <r_i, c_j>, with r (K, code_dim) computed from the last hidden states of the image positions
    # (which, with the image after the request, already know the referent). ``readout_bottleneck`` channels per
    # image position and per code position. Measured (session 13, tiny-himtok from scratch, 20 minutes on one core
    # each, train-seed val cIoU with own answers over 256 sentences): without 0.106, with 0.168, with and every mask
    # decoded in the mask loss (``mask_loss_samples`` None instead of 8) 0.190; the codebook adapter instead: 0.077.
    patch_readout: bool = False
    readout_bottleneck: int = 16
    # Weight of ``readout_ce``, the CE of the code logits decoding uses (with a readout on). The codes are hard to
    # name exactly (~5.6 nats each at 1k steps against ~0.2 for the answer's words), and that term's gradient
    # reaches the LM's states at the code positions, which read the words that name the referent; the mask loss
    # trains the same logits through the soft codes. Measured (session 21, tiny-himtok from scratch, 60 minutes on
    # both cores, 3,381 steps; seed-1, 500 per split, own answers, bf16 weights): 0.3 against 1.0 gave val / testA /
    # testB cIoU 0.776 / 0.884 / 0.620 against 0.768 / 0.875 / 0.571, answers naming the referent (200 per split)
    # val / testB 0.58 / 0.44 against 0.54 / 0.36, QA 0.816 against 0.732, but testB no-target accuracy 0.878
    # against 0.976 (36 against 40 of 41). 0.3 in tiny-himtok. The logged ``readout_ce`` is the weighted term.
    readout_ce_weight: float = 1.0
    # Gate the patch readout by the answer (see AnswerGate): the hidden state at <mt_start>, which has read the
    # answer's naming of the referent, scores each image position; the readout reads the positions scaled by that
    # gate (and the gate itself), and the gate is trained against the target's share of each position's cell
    # (BCE + Dice, weight ``readout_gate_weight``). Needs ``patch_readout``. Off: the readout sees the prompt only.
    # Measured (session 18, 60 minutes from scratch on both cores with ``code_text_ce`` off, batch 64, lr 1.4e-3,
    # warmup 300, ``mask_loss_samples`` 32; ``benchmarks/description.py``, 200 seed-1 sentences per split): with the
    # true description forced, testB cIoU 0.731 against the committed model's 0.661 (the mask follows the words
    # more), but the answers named the referent no more often (testB 0.225 against 0.26; STAMP 0.78), and in
    # 3,803 steps in-run val cIoU reached 0.608 against the committed run's 0.738. With ``image_merge`` 2 too
    # (5,161 steps): testB named 0.445 (the merged prefix reasons better), forced 0.633 (a 4x4 gate draws coarser),
    # seed-1 val / testB 0.576 / 0.443 against the committed 0.694 / 0.507. Off in the presets.
    readout_query: bool = False
    readout_query_dim: int = 64
    readout_gate_weight: float = 1.0
    # The readouts (and the answer gate) read STAMP's mask queries instead of the prefix's image positions: one query
    # per vision patch (its projected feature + a mask embedding + a learned position), run through the LM right
    # after <mt_start>, reading the request, the image and the answer's words, bidirectional among themselves (see
    # :mod:`mmseg.modeling.heads.mask_queries`). One more LM pass per mask point, at the vision tower's full grid
    # even when the prefix merges patches (``image_merge``). Why: the prefix's image positions precede the answer;
    # STAMP's queries follow it, and its masks follow the words (session 18, ``benchmarks/description.py``).
    # Needs ``patch_readout`` or ``mask_readout``. Measured (session 19, with ``readout_query``, ``image_merge`` 2,
    # ``code_text_ce`` off, batch 64, lr 1.4e-3, ``mask_loss_samples`` 32, both cores): in-run val cIoU 0.262 at
    # 1,000 steps (the same recipe without the queries, session 18: 0.182; the committed run: 0.239), but 42-46
    # samples/s against 80-109: the 64 queries ride on every row and nearly double the LM's tokens, so 60 minutes
    # would give ~2,300 steps. Stopped there; off in the presets.
    readout_queries: bool = False
    # Sharpen every decoded mask against the image (see MaskRefiner): a small convolutional net over the pixels and
    # the tokenizer's decoded mask adds a residual to its logits, zero at the start. It is trained through the full
    # decode's mask loss (the loss scores the mask decoding returns), so the codes still say where and what shape,
    # and the refiner puts the edges where the image has them. ``refine_channels`` 0 = off.
    # Why: the frozen tokenizer's own round trip caps every mask (IoU 0.874 at k = 32 for synthref-himtok's), while
    # STAMP, which draws from the pixels, reaches cIoU 0.93 given the true description.
    # Measured (session 19, tiny-himtok + 24 channels, 60 minutes from scratch on both cores of a machine that gave
    # half the matmul peak of the committed run's, 417 against 895 GFLOP/s, so 3,841 steps against 7,359): in-run
    # val cIoU 0.266 / 0.514 / 0.572 at 1k / 2k / 3k steps and 0.679 at the end, against the committed run's
    # 0.239 / 0.296 / 0.486 and 0.612 at 4k. Seed-1, 500 per split, own answers: val / testA / testB 0.680 / 0.752 /
    # 0.502, and the same codes unrefined (``refine_mask=False``) 0.565 / - / 0.415; with the true description forced
    # (200 per split) val 0.811 and testB 0.674 (committed 0.762 / 0.661). The refiner costs ~20 ms of a ~660 ms
    # step (batch 32). On in tiny-himtok (24). Decoding refines every decode, ``keep_tokens`` prefixes included,
    # though training refines full decodes only: refined prefixes of 8 and 16 codes scored val 0.674 / 0.678 against
    # 0.680 for all 32 (unrefined 0.545 / 0.557 / 0.565); ``refine_mask=False`` shows the tokenizer's coarse-to-fine.
    refine_channels: int = 0
    # Score the code tokens in the shared text cross-entropy too (as HiMTok). Off: the text CE scores the answer's
    # words (and <mt_start> / <mt_end>) only, and the codes are trained by ``readout_ce`` (the CE of the summed
    # logits decoding uses) and the mask loss; needs a readout. Why: the text CE is a mean over scored tokens, and
    # a target answer has ~10 words beside its 32 codes, so the codes (hard, ~4 nats each) took ~3/4 of the LM's
    # text signal, and the words that name the referent (colour, kind, place: what STAMP's text CE trains) a
    # quarter, while the codes were scored a second time by readout_ce. Measured (session 17, tiny-himtok with this
    # off, both cores, in-run val cIoU over 256 train-seed sentences): 0.236 / 0.329 / 0.392 at 1k / 2k / 3k steps
    # (stopped there) against the committed run's 0.239 / 0.296 / 0.486: the words' CE was already 0.18 at 1k
    # steps (template answers), so they carry little signal either way, and the relational skill came no sooner
    # (0.16 at 3k). Then, with the refiner, ``image_merge`` 2, batch 64 and ``mask_loss_samples`` 16 (session 20, 60
    # minutes from scratch on both cores of a half-speed machine, 426 GFLOP/s): on, in-run val 0.356 / 0.562 / 0.685
    # at 1k / 2k / 3k and 0.701 at the end, the answers naming the referent 0.40 (seed-1 val / testB 0.669 / 0.488);
    # off, 0.384 / 0.685 / 0.735 and 0.751, named 0.57 (seed-1 0.768 / 0.571: the committed synthref-himtok). Once
    # the refiner draws the mask, the words decide it (forced true descriptions: testB 0.81), and they learn faster
    # without the codes in their CE. Off in tiny-himtok.
    code_text_ce: bool = True
    # Add the frozen tokenizer's OWN reading of a predicted mask to the code logits (see MaskReadout): the image
    # positions' last hidden states predict a coarse mask of the referent (``mask_readout_upsample`` pixels per
    # position and side, trained densely against the target with BCE + Dice, weight ``mask_readout_weight``); the
    # tokenizer's encoder turns it into one latent per code position, and code position i's logit for code j gains
    # ``scale * cos(z_i, c_j)`` (``scale`` learned, starting at ``mask_readout_scale``).
    # Measured (session 17, tiny-himtok + this + the successor tokenizer, 60 minutes from scratch on both cores,
    # in-run val cIoU over 256 train-seed sentences): 0.265 / 0.375 / 0.517 / 0.585 / 0.618 at 1k-4k steps and the
    # end (5,448 steps; ~50 samples/s against ~67 without, the encoder's backward); the same recipe without it
    # (session 16): 0.234 / 0.399 / 0.524 / 0.574 / 0.653 at 1k-4k and 7,022 steps. No better per step, slower per
    # minute; off in the presets.
    mask_readout: bool = False
    mask_readout_upsample: int = 4
    mask_readout_weight: float = 1.0
    # Small at the start: an untrained coarse mask is uniform grey, whose codes are the same for every request.
    mask_readout_scale: float = 1.0


def coarse_mask_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE + Dice of coarse mask ``logits (N, h, w)`` against ``masks (N, S, S)`` in {0, 1}, area-downsampled to
    ``(h, w)`` (each cell's covered share as a soft target)."""
    target = downsample_targets(masks, tuple(logits.shape[-2:]))
    return bce_loss(logits, target) + dice_loss(logits, target)


def random_subset(n: int, cap: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """Indices ``(min(n, cap),)`` of a random subset of ``0..n-1`` in increasing order; all of them when ``cap`` is
    None or at least ``n``."""
    if cap is None or n <= cap:
        return torch.arange(n, device=device)
    return torch.randperm(n, device=device)[:cap].sort().values


def code_token(index: int, codebook_size: int) -> str:
    """The vocabulary token of code ``index``: ``<mt_0042>`` (at least four digits)."""
    return f"<mt_{index:0{max(4, len(str(codebook_size - 1)))}d}>"


def mask_token_names(codebook_size: int) -> list[str]:
    """``<mt_start>``, ``<mt_end>`` and one token per code, in vocabulary order."""
    return [MT_START, MT_END, *(code_token(i, codebook_size) for i in range(codebook_size))]


def preset_tokenizer_folder(config: HiMTokConfig) -> Path:
    """The mask tokenizer folder a preset names, checked to exist (clear error naming the training command)."""
    if not config.tokenizer:
        raise ValueError(
            'the himtok head needs "tokenizer": the folder of a trained mask tokenizer; train one with '
            + TRAIN_COMMAND.format(folder="checkpoints/synthref-himtok/mask_tokenizer")
        )
    folder = Path(config.tokenizer).expanduser()
    if not (folder / TOKENIZER_CONFIG_FILE).is_file():
        where = folder if folder.is_absolute() else f"{folder} (relative to the current directory {Path.cwd()})"
        raise FileNotFoundError(
            f"mask tokenizer not found: {where} has no {TOKENIZER_CONFIG_FILE}. Train one with "
            f"`{TRAIN_COMMAND.format(folder=folder)}` or point the himtok head's \"tokenizer\" at a trained one"
        )
    return folder


def read_tokenizer_config(folder: Path) -> MaskTokenizerConfig:
    """The config of the mask tokenizer in ``folder`` (without loading its weights)."""
    return MaskTokenizerConfig(**json.loads((Path(folder) / TOKENIZER_CONFIG_FILE).read_text()))


class CodebookAdapter(torch.nn.Module):
    """Ties the code tokens' embedding rows to the mask tokenizer's codebook, on top of the LM's own rows.

    Input side: the embedding of code token ``j`` gains ``A c_j``; output side: its logit gains ``<B h, c_j>``, where
    ``c_j (code_dim,)`` is code ``j``'s L2-normalised codebook vector, ``A (D, code_dim)`` and ``B (code_dim, D)``
    learned, zero at the start (a new adapter changes nothing). Both are forward hooks on the LM's input and output
    embedding modules, so every path that embeds a token or scores one (training, cached generation, the shaper)
    sees the same tokens and the LM's own modules stay unmodified.

    Why: with free rows, each of the 1,024 code tokens is a separate class that a tiny LM trained from scratch must
    learn from the few times it is the target (measured, tiny-himtok at 1,000 steps: about 5 nats per code token,
    against 6.9 for chance). Through ``B`` the LM instead predicts a point in the ``code_dim``-dimensional code
    space, and every code gets credit by its similarity to the target: a regression with 12 outputs in place of a
    1,024-way classification.

    Measured (session 5, tiny-himtok + this adapter + ``ground_presence``, against the preset, same data and
    seed): teacher-forced losses fell much faster (at 2,000 steps text CE 2.38 against 2.74, mask Dice term 0.046
    against 0.055), but cIoU with the model's own answers was WORSE (0.050 against 0.157 at 2,000 steps): the LM
    leaned on the previous codes' geometry, which it reads exactly when teacher-forced, and in free decoding
    several requests collapsed onto one code sequence. Off in the presets until paired with a remedy for that
    exposure bias (e.g. corrupting input codes during training).
    """

    def __init__(self, hidden_size: int, code_dim: int) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(code_dim, hidden_size, bias=False)
        self.predict = torch.nn.Linear(hidden_size, code_dim, bias=False)
        torch.nn.init.zeros_(self.embed.weight)
        torch.nn.init.zeros_(self.predict.weight)


class PatchReadout(torch.nn.Module):
    """Image positions' last hidden states ``(B, P, D)`` -> one vector per code position ``(B, K, code_dim)``.

    ``LayerNorm -> Linear(D, b)`` per image position, a dense ``Linear(P * b, K * b)`` from every image position to
    every code position, GELU, ``Linear(b, code_dim)``, zero at the start (a new readout changes nothing). The head
    adds ``r_i . c_j`` to code position ``i``'s logit of code ``j`` (``c_j`` the frozen tokenizer's normalised
    code vector), in training and in decoding alike.

    Why: a code says WHERE the mask is and what shape it has, globally; the LM has to gather that from the image
    positions by attention alone, and attention starts out averaging them all (a small object's one or two
    positions are diluted ~30x). That is the problem the mask tokenizer's own encoder had before its dense
    patch -> latent map (see ``MaskTokenizer.to_latents``), and this is the same remedy on the LM side: a learned
    map from each image position's (request-aware) state to each code carries the place from the first steps.
    It reads only the prompt (and, gated, the ``<mt_start>`` state), so it is the same whether the codes before
    were teacher-forced or generated.
    """

    def __init__(self, hidden_size: int, patches: int, num_tokens: int, code_dim: int, bottleneck: int,
                 gated: bool = False) -> None:
        super().__init__()
        self.patches, self.num_tokens, self.bottleneck, self.gated = patches, num_tokens, bottleneck, gated
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.down = torch.nn.Linear(hidden_size, bottleneck)
        # Gated: each position's channels are scaled by its gate, and the gate logit itself is one more channel.
        self.mix = torch.nn.Linear(patches * (bottleneck + int(gated)), num_tokens * bottleneck)
        self.up = torch.nn.Linear(bottleneck, code_dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, image_hidden: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """``image_hidden (B, P, D)``, ``gate (B, P)`` logits (required iff built ``gated``) -> ``(B, K, code_dim)``."""
        b, p, _ = image_hidden.shape
        if p != self.patches:
            raise ValueError(f"patch_readout was built for {self.patches} image positions, the prompt has {p}")
        if (gate is None) == self.gated:
            raise ValueError("a gated patch readout needs the answer gate's logits" if self.gated
                             else "this patch readout was built without a gate")
        x = self.down(self.norm(image_hidden))  # (B, P, b)
        if gate is not None:
            gate = gate.to(x.dtype)[..., None]
            x = torch.cat([x * torch.sigmoid(gate), gate], dim=-1)
        x = F.gelu(self.mix(x.flatten(1))).view(b, self.num_tokens, self.bottleneck)
        return self.up(x)  # (B, K, code_dim)


class AnswerGate(torch.nn.Module):
    """Which image positions the answer so far names: the hidden state at ``<mt_start>`` ``(B, D)`` (it has read
    the request, the image and the answer's words) against the image positions' hidden states ``(B, P, D)`` ->
    logits ``(B, P)``, ``<W_q LN(q), W_k LN(h_p)> / sqrt(d) + b``. Trained densely against the share of each
    position's cell the target covers, and it gates the patch readout (``readout_query``).

    Why: the image positions precede the answer, so a readout of them alone sees the request but not the answer's
    own naming of the referent ("the red cross at the bottom left"). That naming is where a relational request is
    resolved, by next-token prediction, and STAMP's mask queries, which follow the answer, draw the named object
    (seed-1 testB cIoU 0.92 with the true description forced, against 0.66 for ``synthref-himtok``'s codes, whose
    readout cannot see it; session 18). Matching a named colour, kind and place against the positions' states is
    the easy, attribute-like part; this gate makes the readout do that.
    """

    def __init__(self, hidden_size: int, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"readout_query_dim must be >= 1, got {dim}")
        self.scale = dim ** -0.5
        self.query_norm = torch.nn.LayerNorm(hidden_size)
        self.key_norm = torch.nn.LayerNorm(hidden_size)
        self.query = torch.nn.Linear(hidden_size, dim)
        self.key = torch.nn.Linear(hidden_size, dim)
        self.bias = torch.nn.Parameter(torch.tensor(-2.0))  # most positions are background

    def forward(self, query: torch.Tensor, image_hidden: torch.Tensor) -> torch.Tensor:
        q = self.query(self.query_norm(query))  # (B, d)
        k = self.key(self.key_norm(image_hidden))  # (B, P, d)
        return (k @ q[..., None])[..., 0] * self.scale + self.bias  # (B, P)


class MaskRefiner(torch.nn.Module):
    """Decoded mask logits ``(N, m, m)`` and the images ``(N, 3, S, S)`` -> refined logits ``(N, m, m)``.

    A two-layer stride-4 convolutional stem over the pixels (STAMP's), joined on its grid with the mask (area-resized:
    its probability and its clipped logits), two 3x3 convolutions and a 1x1 give a residual, resized bilinearly onto
    the ``m x m`` logits. The last layer starts at zero, so a new refiner returns the tokenizer's mask unchanged.

    Why stride 4: at the tokenizer's 64 px the convolutions cost ~40% of a tiny-himtok training step on this CPU
    (session 19: 4,100 steps in 60 minutes against 7,359 without); on the 32 px grid, a quarter of that.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"refine_channels must be >= 1 to refine, got {channels}")
        c = channels
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, stride=2, padding=1), torch.nn.GELU(),
                                        torch.nn.Conv2d(c, c, 3, stride=2, padding=1), torch.nn.GELU())
        self.fuse = torch.nn.Sequential(torch.nn.Conv2d(c + 2, c, 3, padding=1), torch.nn.GELU(),
                                        torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.GELU(),
                                        torch.nn.Conv2d(c, 1, 1))
        torch.nn.init.zeros_(self.fuse[-1].weight)
        torch.nn.init.zeros_(self.fuse[-1].bias)

    def forward(self, logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"{logits.shape[0]} masks to refine against {pixel_values.shape[0]} images")
        stem = self.stem(pixel_values.to(self.stem[0].weight.dtype))  # (N, c, S/4, S/4)
        mask = F.adaptive_avg_pool2d(logits[:, None].to(stem.dtype), stem.shape[-2:])
        delta = self.fuse(torch.cat([stem, torch.sigmoid(mask), mask.clamp(-10, 10) / 10], dim=1))
        delta = F.interpolate(delta, size=logits.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return logits + delta.to(logits.dtype)


class MaskReadout(torch.nn.Module):
    """Image positions' last hidden states ``(B, gh * gw, D)`` (row-major) -> a coarse mask of the referent,
    ``(B, gh * s, gw * s)`` logits (``s`` = ``upsample``): ``LayerNorm -> Linear(D, s * s)`` per position, each
    position painting its own ``s x s`` block. The head passes the mask through the frozen tokenizer's encoder and
    adds ``scale * cos(z_i, c_j)`` to code position ``i``'s logit of code ``j``.

    Why: nearest-code encoding IS ``argmax_j cos(z_i, c_j)``, so once the coarse mask is right, these terms alone
    name the codes the tokenizer would give the true mask, and the LM (and the patch readout) only correct them.
    The hard part of HiMTok for a small LM is turning "which patches are the referent" into 32 global codes; the
    tokenizer's encoder already knows that map, and a per-patch mask is what the image positions learn fastest
    (STAMP's dense per-patch loss bound the request to the image within 1,000 steps, see ``grounding.py``). The mask
    stays a means: decoding still reads codes and the tokenizer's decoder draws the mask, ``keep_tokens`` included.
    """

    LOG_SCALE_GAIN = 10.0

    def __init__(self, hidden_size: int, grid: tuple[int, int], upsample: int, scale: float) -> None:
        super().__init__()
        if upsample < 1:
            raise ValueError(f"mask_readout_upsample must be >= 1, got {upsample}")
        if scale <= 0:
            raise ValueError(f"mask_readout_scale must be > 0, got {scale}")
        self.grid, self.upsample = tuple(grid), upsample
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.paint = torch.nn.Linear(hidden_size, upsample * upsample)
        # scale = exp(LOG_SCALE_GAIN * u): Adam moves u by about the learning rate per step, so the gain lets the
        # scale travel 1 -> 30 (or back) in a few hundred steps; as exp(u) alone it would take thousands.
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scale) / self.LOG_SCALE_GAIN))

    @property
    def scale(self) -> torch.Tensor:
        """The learned scale of the cosine terms, a 0-dim tensor."""
        return torch.exp(self.LOG_SCALE_GAIN * self.log_scale)

    def forward(self, image_hidden: torch.Tensor) -> torch.Tensor:
        b, p, _ = image_hidden.shape
        (gh, gw), s = self.grid, self.upsample
        if p != gh * gw:
            raise ValueError(f"mask_readout was built for {gh * gw} image positions, the prompt has {p}")
        blocks = self.paint(self.norm(image_hidden)).float().view(b, gh, gw, s, s)
        return blocks.permute(0, 1, 3, 2, 4).reshape(b, gh * s, gw * s)


@register_head
class HiMTokHead(MaskHead):
    name = "himtok"
    config_cls = HiMTokConfig
    # Per-call options; subclasses extend (check_options). ``refine_mask=False``: the tokenizer's own decode,
    # unrefined (offered only by a head with a refiner: elsewhere it is an unknown option, a clear error).
    option_names: tuple[str, ...] = ("keep_tokens", "refine_mask")

    def __init__(self, config: HiMTokConfig, hidden_size: int, image_size: int, grid_size: tuple[int, int],
                 asset_dir: Path | None = None, prefix_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.config = config
        if asset_dir is not None:
            folder = Path(asset_dir) / TOKENIZER_DIR
            if not (folder / TOKENIZER_CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{asset_dir} is a himtok checkpoint without its mask tokenizer: expected "
                                        f"{folder}/ (written by save_pretrained)")
        else:
            folder = preset_tokenizer_folder(config)
        declared = (config.codebook_size, config.code_dim, config.num_tokens)
        expected = None
        if None not in declared:
            expected = MaskTokenizerConfig(codebook_size=config.codebook_size, code_dim=config.code_dim,
                                           num_tokens=config.num_tokens)
        tokenizer = MaskTokenizer.from_pretrained(folder, expected=expected)
        found = tokenizer.config
        for key in ("codebook_size", "num_tokens", "code_dim"):
            want = getattr(config, key)
            if want is not None and want != getattr(found, key):
                raise ValueError(f"mask tokenizer in {folder} has {key}={getattr(found, key)}, but the himtok head's "
                                 f"config says {want}")
        # Frozen and kept OUT of the module tree: not in named_parameters (never optimised, never decayed), not
        # in state_dict (its weights live once, in mask_tokenizer/), not switched to train mode (which would let
        # the quantizer update its usage statistics). _apply below still moves and casts it with the model.
        tokenizer.requires_grad_(False).eval()
        self._frozen = [tokenizer]
        self.num_tokens = found.num_tokens
        self.codebook_size = found.codebook_size
        self._code_cache = BudgetMemo(256 * 2**20)  # binarised target -> codes (see codes_of)
        self._host_tokenizer: list[MaskTokenizer] | None = None  # see host_targets
        self.adapter = CodebookAdapter(hidden_size, found.code_dim) if config.codebook_adapter else None
        self.readout = None
        # The readouts read the LM prefix's image positions (merged or not), or one mask query per vision patch.
        gh, gw = grid_size if config.readout_queries else (prefix_grid or grid_size)
        self.readout_grid = (gh, gw)
        if config.readout_queries and not (config.patch_readout or config.mask_readout):
            raise ValueError("himtok head: readout_queries feeds the readouts; turn on patch_readout or mask_readout")
        self.queries = MaskQueries(hidden_size, gh * gw) if config.readout_queries else None
        if config.readout_query and not config.patch_readout:
            raise ValueError("himtok head: readout_query gates the patch readout; turn on patch_readout too")
        self.answer_gate = AnswerGate(hidden_size, config.readout_query_dim) if config.readout_query else None
        if config.patch_readout:
            self.readout = PatchReadout(hidden_size, gh * gw, found.num_tokens, found.code_dim,
                                        config.readout_bottleneck, gated=config.readout_query)
        for field in dataclasses.fields(config):  # every loss weight: a negative one would train the term upwards
            if field.name.endswith("_weight") and getattr(config, field.name) < 0:
                raise ValueError(f"himtok head: {field.name} must be >= 0, got {getattr(config, field.name)}")
        if not config.code_text_ce and not (config.patch_readout or config.mask_readout):
            raise ValueError("himtok head: code_text_ce false leaves the code tokens to the readouts' cross-entropy; "
                             "turn on patch_readout or mask_readout, or keep code_text_ce true")
        self.refiner = MaskRefiner(config.refine_channels) if config.refine_channels else None
        if self.refiner is None:
            self.option_names = tuple(name for name in self.option_names if name != "refine_mask")
        self.mask_readout = None
        if config.mask_readout:
            self.mask_readout = MaskReadout(hidden_size, (gh, gw), config.mask_readout_upsample,
                                            config.mask_readout_scale)

    @property
    def reads_prompt(self) -> bool:
        """Whether the head has a readout: code-logit terms read from the prompt (see :meth:`readout_logits`)."""
        return self.readout is not None or self.mask_readout is not None

    @property
    def has_readout(self) -> bool:
        """Whether decoding adds terms to the LM's own code logits (:meth:`session_readout`); a subclass may add
        terms of its own (the shaper's steering)."""
        return self.reads_prompt

    @property
    def mask_tokenizer(self) -> MaskTokenizer:
        return self._frozen[0]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.mask_tokenizer._apply(fn, recurse)
        return self

    # -- vocabulary -------------------------------------------------------------------------------------
    @classmethod
    def special_tokens_for(cls, config: HiMTokConfig) -> list[str]:
        size = config.codebook_size
        if size is None:
            size = read_tokenizer_config(preset_tokenizer_folder(config)).codebook_size
        return mask_token_names(size)

    def special_tokens(self) -> list[str]:
        return mask_token_names(self.codebook_size)

    def bind(self, processor: Any, lm: torch.nn.Module) -> None:
        super().bind(processor, lm)
        vocab = processor.tokenizer.get_vocab()
        names = self.special_tokens()
        present = sum(1 for t in vocab if _CODE_TOKEN.match(t))
        missing = [t for t in names if t not in vocab]
        if missing or present != self.codebook_size:
            raise ValueError(
                f"the text vocabulary has {present} mask code tokens but the mask tokenizer has {self.codebook_size} "
                f"codes{f' (missing e.g. {missing[:3]})' if missing else ''}: the model and its mask tokenizer "
                "were built for different codebooks"
            )
        self.mt_start_id, self.mt_end_id = vocab[MT_START], vocab[MT_END]
        self.image_token_id = processor.image_token_id
        self.mask_point_token_id = self.mt_start_id
        code_ids = [vocab[t] for t in names[2:]]
        self._code_of = {token: code for code, token in enumerate(code_ids)}  # vocabulary id -> code index
        self._code_token_list = code_ids
        self.register_buffer("code_token_ids", torch.tensor(code_ids, dtype=torch.long), persistent=False)
        vocab_rows = lm.get_input_embeddings().num_embeddings
        index = torch.full((vocab_rows,), -1, dtype=torch.long)
        index[torch.tensor(code_ids)] = torch.arange(len(code_ids))
        self.register_buffer("code_index", index, persistent=False)  # vocabulary id -> code, -1 for text
        if self.adapter is not None:
            self.unhook()
            self._hooks = [lm.get_input_embeddings().register_forward_hook(self._adapt_embeddings),
                           lm.get_output_embeddings().register_forward_hook(self._adapt_logits)]

    def unhook(self) -> None:
        """Take this head's adapter hooks off the LM (when another head takes the LM over, see the shaper)."""
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []

    def _codebook(self, dtype: torch.dtype) -> torch.Tensor:
        return self.mask_tokenizer.quantizer.normalized_codebook().to(dtype)  # (V, code_dim)

    def _adapt_embeddings(self, module: torch.nn.Module, args, embeds: torch.Tensor) -> torch.Tensor:
        """Hook on the input embeddings: ``embeds (..., D)`` of ``ids (...)`` gain ``A c_j`` where ``ids`` are codes."""
        index = self.code_index[args[0]]  # (...)
        is_code = index >= 0
        if not bool(is_code.any()):
            return embeds
        shift = self.adapter.embed(self._codebook(embeds.dtype)[index.clamp(min=0)]).to(embeds.dtype)
        return embeds + shift * is_code[..., None].to(embeds.dtype)

    def _adapt_logits(self, module: torch.nn.Module, args, logits: torch.Tensor) -> torch.Tensor:
        """Hook on the output layer: ``logits (..., vocab)`` from ``hidden (..., D)`` gain ``<B h, c_j>`` at the codes."""
        predicted = self.adapter.predict(args[0])  # (..., code_dim)
        extra = (predicted @ self._codebook(predicted.dtype).t()).to(logits.dtype)  # (..., V)
        return logits.index_add(-1, self.code_token_ids, extra)

    def options(self) -> dict[str, Any]:
        found = self.mask_tokenizer.config
        config = dataclasses.replace(self.config, codebook_size=found.codebook_size, num_tokens=found.num_tokens,
                                     code_dim=found.code_dim)
        return {"name": self.name, **dataclasses.asdict(config)}

    def save_assets(self, folder: Path) -> None:
        self.mask_tokenizer.save_pretrained(Path(folder) / TOKENIZER_DIR)

    # -- decoding codes into masks ----------------------------------------------------------------------
    def code_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids ``labels (...)`` -> code indices ``(...)``, -100 (cross-entropy's ignore index) wherever the
        label is ignored (< 0) or not a code token."""
        index = self.code_index[labels.clamp(min=0)]
        return torch.where((labels >= 0) & (index >= 0), index, -100)

    def readout_logits(self, ids: torch.Tensor, hidden: torch.Tensor, query: torch.Tensor | None = None,
                       image: torch.Tensor | None = None) -> torch.Tensor | None:
        """``ids (B, T)`` holding the image positions and their last hidden states ``(B, T, D)`` -> the readouts'
        terms for the K code positions' logits ``(B, K, V)`` float (patch readout + mask readout, whichever the
        head has); None without a readout. ``query (B, D)``: the last hidden state at each row's ``<mt_start>``,
        needed when the readout is gated by the answer (``readout_query``). ``image (B, P, D)``: the mask queries'
        last hidden states, needed (and read instead of the prefix's image positions) with ``readout_queries``."""
        return self._readouts(ids, hidden, query, image)[0]

    def _readouts(self, ids: torch.Tensor, hidden: torch.Tensor, query: torch.Tensor | None = None,
                  image: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(terms (B, K, V) or None, the mask readout's coarse mask logits (B, h, w) or None, the answer gate's
        logits (B, P) or None)``."""
        if not self.reads_prompt:
            return None, None, None
        if (image is not None) != (self.queries is not None):
            raise ValueError("this himtok head's readouts read its mask queries (readout_queries): pass their hidden "
                             "states as image" if self.queries is not None else
                             "this himtok head's readouts read the prompt's image positions, not mask queries")
        if image is None:
            image = hidden[ids == self.image_token_id].view(ids.shape[0], -1, hidden.shape[-1])
        codebook = self._codebook(torch.float32)
        terms, coarse, gate = 0.0, None, None
        if self.answer_gate is not None:
            if query is None:
                raise ValueError("this himtok head's readout is gated by the answer (readout_query): pass the hidden "
                                 "state at <mt_start> as query")
            gate = self.answer_gate(query, image)
        if self.readout is not None:
            terms = self.readout(image, gate).float() @ codebook.t()
        if self.mask_readout is not None:
            coarse = self.mask_readout(image)  # (B, h, w)
            # Through the frozen encoder (no parameter of it trains; the gradient reaches the coarse mask).
            latents = self.mask_tokenizer.encode_latents(torch.sigmoid(coarse)).float()  # (B, K, code_dim)
            cosine = F.normalize(latents, dim=-1) @ codebook.t()
            terms = terms + self.mask_readout.scale * cosine
        return terms, coarse, gate

    def session_readout(self, session: "DecodeSession", rows: torch.Tensor, steps: list[int],
                        query: torch.Tensor | None = None) -> torch.Tensor:
        """The readout's terms ``(n, V)`` for the next code of ``rows (n,)``, code index ``steps[i]`` each (clamped
        to the last code). Read from the prompt once per session and kept there; when the readout reads the
        mask point (the answer gate, or mask queries), once per mask point, with its ``<mt_start>`` state.

        ``query (n, D)``: the rows' ``<mt_start>`` states, for a read made before decoding has recorded them (the
        shaper's checkpoint at ``<mt_start>`` itself, inside ``after_step``); such a read is not kept, since the
        shift injected there changes both the state and the cache the queries read."""
        index = torch.tensor([min(n, self.num_tokens - 1) for n in steps], device=rows.device)
        at_point = self.answer_gate is not None or self.queries is not None
        if query is not None and at_point:
            return self._session_read(session, rows.tolist(), query)[torch.arange(len(index)), index]
        # Per row: (the read's key, its terms (K, V)). Read at the prompt, one read per session (key 0); at the mask
        # point, one per mask point (key: the row's number of recorded mask points), so a new <mt_start> reads afresh.
        cache: dict[int, tuple[int, torch.Tensor]] = session.state.setdefault(READOUT_KEY, {})
        key = {r: len(session.point_hidden[r]) if at_point else 0 for r in rows.tolist()}
        stale = [r for r in key if cache.get(r, (-1,))[0] != key[r]]
        if stale:
            query = torch.stack([session.point_hidden[r][-1] for r in stale]) if at_point else None
            terms = self._session_read(session, stale, query)
            cache.update({r: (key[r], terms[i]) for i, r in enumerate(stale)})
        return torch.stack([cache[r][1] for r in rows.tolist()])[torch.arange(len(index)), index]

    def _session_read(self, session: "DecodeSession", rows: list[int], query: torch.Tensor | None) -> torch.Tensor:
        """The readouts' terms ``(n, K, V)`` for ``rows`` of a decode session, the gate's ``query (n, D)`` given."""
        at = torch.tensor(rows, device=session.device)
        image = self.session_queries(session, rows)[at] if self.queries is not None else None
        return self.readout_logits(session.prompt_ids[at], session.prompt_hidden[at], query, image)

    def session_queries(self, session: "DecodeSession", rows: list[int]) -> torch.Tensor:
        """The mask queries' last hidden states ``(B, P, D)`` read at the latest mask point of each of ``rows``
        (one LM pass for the whole batch; other rows' entries are meaningless)."""
        live = torch.zeros(session.batch_size, dtype=torch.bool, device=session.device)
        live[rows] = True
        points = torch.tensor([p[-1] if p else 0 for p in session.mask_points], device=session.device)
        return run_mask_queries(session, self.queries(session.image_features), points, live)

    def soft_codes(self, code_logits: torch.Tensor) -> torch.Tensor:
        """LM logits over the code tokens ``(..., V)`` -> code probabilities ``(..., V)`` (HiMTok's sharpening)."""
        return torch.softmax(self.config.soft_temperature * code_logits.float(), dim=-1)

    def decode_probs(self, probs: torch.Tensor, keep: int | torch.Tensor | None = None,
                     pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Code probabilities ``(N, n, V)`` -> mask logits ``(N, m, m)`` at the tokenizer's ``mask_size``, using
        the first ``keep`` positions (an int or ``(N,)``); differentiable w.r.t. ``probs``. With a refiner, pass
        the images ``pixel_values (N, 3, S, S)``: the masks are refined against them (without, not refined)."""
        dtype = self.mask_tokenizer.quantizer.codebook.dtype
        return self.refine(self.mask_tokenizer.decode_soft(probs.to(dtype), keep=keep).float(), pixel_values)

    def refine(self, logits: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Decoded mask logits ``(N, m, m)`` refined against their images ``pixel_values (N, 3, S, S)`` (see
        :class:`MaskRefiner`); unchanged without a refiner or without images."""
        if self.refiner is None or pixel_values is None:
            return logits
        return self.refiner(logits, pixel_values).float()

    # -- training ---------------------------------------------------------------------------------------
    def host_targets(self) -> None:
        """Encode training targets with a CPU copy of the frozen tokenizer (kept outside the module tree, so moving
        the model leaves it on the CPU): HiMTok's targets are the tokenizer's codes of the ground-truth mask."""
        if self._host_tokenizer is None:
            self._host_tokenizer = [copy.deepcopy(self.mask_tokenizer).cpu().eval()]  # a list: not a submodule

    def extra_inputs(self, batch: dict[str, torch.Tensor], image_features: torch.Tensor) -> ExtraInputs | None:
        """With ``readout_queries``: one mask query per patch after the text, reading it through ``<mt_start>``."""
        if self.queries is None:
            return None
        return query_training_inputs(self.queries(image_features), batch["seg_positions"], batch["attention_mask"])

    def text_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels (B, T)`` without the code tokens when ``code_text_ce`` is off (see :class:`HiMTokConfig`)."""
        if self.config.code_text_ce:
            return labels
        return labels.masked_fill(self.code_targets(labels) >= 0, -100)

    def expand_targets(self, input_ids: list[int], labels: list[int], mask: torch.Tensor | None,
                       rng: random.Random | None = None) -> tuple[list[int], list[int]]:
        """Each labelled ``<seg>`` -> ``<mt_start>`` + the K codes of ``mask (S, S)`` + ``<mt_end>``, all labelled.
        An unlabelled ``<seg>`` (an earlier turn in the prompt) stays as it is, as it does at inference."""
        seg = self.seg_token_id
        if not any(t == seg and l != -100 for t, l in zip(input_ids, labels)):
            return input_ids, labels
        if mask is None:
            raise ValueError("the answer has <seg> but the sample has no mask to encode")
        codes = self.codes_of(mask)
        span = [self.mt_start_id, *(self._code_token_list[c] for c in codes), self.mt_end_id]
        noisy = span
        if self.config.code_input_noise > 0:
            draw = rng or random.Random(int(torch.randint(2**31, ())))  # keyed by the sample when the trainer says so
            p, v = self.config.code_input_noise, self.codebook_size
            inputs = [draw.randrange(v) if draw.random() < p else c for c in codes]
            noisy = [self.mt_start_id, *(self._code_token_list[c] for c in inputs), self.mt_end_id]
        ids_out: list[int] = []
        labels_out: list[int] = []
        for token, label in zip(input_ids, labels):
            if token == seg and label != -100:
                ids_out += noisy
                labels_out += span
            else:
                ids_out.append(token)
                labels_out.append(label)
        return ids_out, labels_out

    def codes_of(self, mask: torch.Tensor) -> list[int]:
        """The K code ids of a target ``mask (S, S)`` in [0, 1], memoised: the tokenizer is frozen and encoding is
        deterministic, and the training loop meets each ground-truth mask once per epoch. Keyed by the binarised
        mask's bytes (what the encoder sees), so a cache hit can never return another mask's codes."""
        encoder = self._host_tokenizer[0] if self._host_tokenizer is not None else self.mask_tokenizer
        return self._code_cache.get(mask_digest(mask), lambda: encoder.encode(mask > 0.5).tolist())

    def sample_prefixes(self, n: int) -> torch.Tensor:
        """``(n, P)`` distinct prefix lengths per mask from ``1..K-1`` with ``p(k) ~ 1 / (k + prefix_offset)``."""
        k = self.num_tokens
        p = max(0, min(self.config.num_prefixes, k - 1))
        if p == 0 or n == 0:
            return torch.zeros(n, 0, dtype=torch.long)
        weights = 1.0 / (torch.arange(1, k, dtype=torch.float32) + self.config.prefix_offset)
        return torch.multinomial(weights.expand(n, -1), p, replacement=False) + 1

    def sample_prefix_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Of ``n`` masks, the ones whose prefixes are decoded (at most ``prefix_samples``, a random subset in order)
        and their prefix lengths: ``(prefixes (M, P), rows (M,))``, the arguments of :meth:`hierarchical_loss`."""
        rows = random_subset(n, self.config.prefix_samples)
        return self.sample_prefixes(len(rows)), rows

    def prefix_sigma(self, k: int) -> float:
        """Blur (pixels at the tokenizer's mask size) of the target for a ``k``-token prefix: strongest at k=1,
        none at k=K."""
        side = self.mask_tokenizer.config.mask_size
        return self.config.prefix_blur * side * (self.num_tokens - k) / max(1, self.num_tokens - 1)

    def hierarchical_loss(self, probs: torch.Tensor, target: torch.Tensor, prefixes: torch.Tensor,
                          prefix_rows: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask loss of HiMTok, unweighted.

        ``probs (N, K, V)`` soft codes, ``target (N, S, S)`` in [0, 1], ``prefixes (M, P)`` prefix lengths for the
        masks ``prefix_rows (M,)`` (indices into N; default: all N masks, in order).
        Returns ``(bce, dice)`` of the full decode of all N and ``prefix_terms (P,)``: column ``j`` is
        ``BCE + dice_weight * Dice`` of every one of the M masks decoded from its ``prefixes[:, j]`` first codes
        against its blurred target. All decodes share ONE decoder pass. With a refiner and ``pixel_values (N, 3,
        S, S)``, the full decodes are refined before they are scored (as decoding returns them); the prefixes,
        scored against blurred targets, are not.
        """
        n, k, _ = probs.shape
        m, p = prefixes.shape
        prefixes = prefixes.to(probs.device)
        prefix_rows = torch.arange(n) if prefix_rows is None else prefix_rows
        prefix_rows = prefix_rows.to(probs.device)
        if prefix_rows.shape[0] != m:
            raise ValueError(f"{m} rows of prefix lengths for {prefix_rows.shape[0]} prefix rows")
        keep = torch.cat([torch.full((n,), k, dtype=torch.long, device=probs.device), prefixes.t().reshape(-1)])
        decoded = torch.cat([probs, probs[prefix_rows].repeat(p, 1, 1)])  # (N + M * P, K, V): full, then column j
        logits = self.decode_probs(decoded, keep)
        side = logits.shape[-2:]
        soft_target = downsample_targets(target, side)
        full = self.refine(logits[:n], pixel_values)
        bce, dice = bce_loss(full, soft_target), dice_loss(full, soft_target)
        prefix_target = soft_target[prefix_rows]
        terms = []
        for j in range(p):
            column = logits[n + m * j : n + m * (j + 1)]
            blurred = torch.empty_like(prefix_target)
            for length in prefixes[:, j].unique().tolist():
                rows = prefixes[:, j] == length
                # .to(): under autocast the blur's convolution returns bf16/fp16 (mixed-precision training)
                blurred[rows] = gaussian_blur(prefix_target[rows], self.prefix_sigma(int(length))).to(blurred.dtype)
            terms.append(bce_loss(column, blurred) + self.config.dice_weight * dice_loss(column, blurred))
        prefix_terms = torch.stack(terms) if terms else logits.new_zeros(0)
        return bce, dice, prefix_terms

    def loss(self, batch: dict[str, torch.Tensor], text_hidden: torch.Tensor, text_logits: torch.Tensor,
             extra_hidden: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``text_logits (B, T, V)``: the logits at ``<mt_start>`` and the next K-1 positions predict the K codes."""
        start = batch["seg_positions"]  # (B,) index of <mt_start>, -1 when the answer has no mask
        t, k = text_logits.shape[1], self.num_tokens
        has = start >= 0
        rows = has.nonzero()[:, 0]
        if rows.numel():  # only spans the answer trains (labelled), with all K codes inside the sequence
            fits = start[rows] + k + 1 < t
            labelled = batch["labels"][rows, (start[rows] + 1).clamp(max=t - 1)] != -100
            rows = rows[fits & labelled]
        w = self.config.mask_loss_weight
        # A zero in the graph, made only where needed: a sum over the (B, T, V) logits and its dense backward cost
        # a step ~1% when made every time.
        def graph_zero() -> torch.Tensor:
            return text_logits.sum() * 0.0

        if rows.numel() == 0:
            zero = graph_zero()
            # every parameter of the head in the graph, so that distributed training stays in step
            out = {"mask_bce": zero + 0.0 * sum(p.sum() for p in self.parameters()), "mask_dice": zero}
            if self.config.num_prefixes > 0:
                out["mask_prefix"] = zero
            if self.reads_prompt:
                out["readout_ce"] = zero
            if self.mask_readout is not None:
                out["readout_mask"] = zero
            if self.answer_gate is not None:
                out["readout_gate"] = zero
            return out
        positions = start[rows, None] + torch.arange(k, device=start.device)  # logits here predict the K codes
        code_logits = text_logits[rows[:, None], positions].index_select(-1, self.code_token_ids)  # (N, K, V)
        out = {}
        if self.reads_prompt:
            # The readouts' terms join the code logits everywhere they are read; the text CE trains the LM's own
            # logits, this CE the sum that decoding will use.
            query = text_hidden[rows, start[rows]] if self.answer_gate is not None else None  # at <mt_start>
            image = extra_hidden[rows] if self.queries is not None else None
            terms, coarse, gate = self._readouts(batch["input_ids"][rows], text_hidden[rows], query, image)
            code_logits = code_logits.float() + terms
            labels = batch["labels"][rows[:, None], positions + 1]
            targets = self.code_targets(labels)
            out["readout_ce"] = self.config.readout_ce_weight * F.cross_entropy(
                code_logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            masks = batch["mask_targets"][rows]
            if gate is not None:
                gate = gate.float().view(-1, *self.readout_grid)
                out["readout_gate"] = self.config.readout_gate_weight * coarse_mask_loss(gate, masks)
            if coarse is not None:
                out["readout_mask"] = self.config.mask_readout_weight * coarse_mask_loss(coarse, masks)
        if self.config.mask_loss_samples is not None and rows.numel() > self.config.mask_loss_samples:
            pick = random_subset(rows.numel(), self.config.mask_loss_samples, rows.device)
            rows, code_logits = rows[pick], code_logits[pick]
        probs = self.soft_codes(code_logits)
        bce, dice, terms = self.hierarchical_loss(probs, batch["mask_targets"][rows], *self.sample_prefix_rows(len(rows)),
                                                  pixel_values=batch["pixel_values"][rows])
        out.update({"mask_bce": w * bce, "mask_dice": w * self.config.dice_weight * dice})
        if self.config.num_prefixes > 0:
            out["mask_prefix"] = w * self.config.prefix_weight * (terms.mean() if terms.numel() else graph_zero())
        return out

    # -- inference --------------------------------------------------------------------------------------
    def keep_tokens(self, options: dict[str, Any]) -> int:
        """The validated ``keep_tokens`` option (default: all K)."""
        k = options.get("keep_tokens")
        if k is None:
            return self.num_tokens
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= self.num_tokens:
            raise ValueError(f"keep_tokens must be a whole number from 1 to {self.num_tokens}, got {k!r}")
        return int(k)

    def check_options(self, options: dict[str, Any]) -> None:
        super().check_options(options)
        self.keep_tokens(options)
        if not isinstance(options.get("refine_mask", True), bool):
            raise ValueError(f"refine_mask must be True or False, got {options['refine_mask']!r}")

    def _open_span(self, tokens: list[int]) -> int | None:
        """How many codes follow an unclosed ``<mt_start>`` at the end of ``tokens``; None when none is open."""
        n = 0
        for token in reversed(tokens):
            if token == self.mt_start_id:
                return n
            if token not in self._code_of:
                return None
            n += 1
        return None

    def in_mask_span(self, session: "DecodeSession") -> torch.Tensor:
        return torch.tensor([self._open_span(t) is not None for t in session.tokens], dtype=torch.bool,
                            device=session.device)

    def constrain(self, session: "DecodeSession", logits: torch.Tensor) -> torch.Tensor:
        """Codes only inside a span (recording their soft distribution), ``<mt_end>`` after K codes, and no code
        or ``<mt_end>`` outside a span. ``logits (B, V)``."""
        state = session.state.setdefault(STATE_KEY, {"probs": [[] for _ in range(session.batch_size)]})
        spans = [self._open_span(t) for t in session.tokens]
        codes, lowest = self.code_token_ids, torch.finfo(logits.dtype).min
        out = logits.clone()
        inside = [r for r, n in enumerate(spans) if n is not None and n < self.num_tokens]
        closing = [r for r, n in enumerate(spans) if n is not None and n >= self.num_tokens]
        outside = [r for r, n in enumerate(spans) if n is None]
        if outside:
            rows = torch.tensor(outside, device=logits.device)
            out[rows[:, None], codes] = lowest
            out[rows, self.mt_end_id] = lowest
        if closing:
            rows = torch.tensor(closing, device=logits.device)
            out[rows] = lowest
            out[rows, self.mt_end_id] = 0.0
        if inside:
            rows = torch.tensor(inside, device=logits.device)
            code_logits = logits[rows[:, None], codes]  # (n, V)
            if self.has_readout:
                code_logits = code_logits + self.session_readout(session, rows, [spans[r] for r in inside]).to(
                    code_logits.dtype)
            out[rows] = lowest
            out[rows[:, None], codes] = code_logits
            probs = self.soft_codes(code_logits)
            for i, row in enumerate(inside):
                self._record(state["probs"][row], session.tokens[row], spans[row], probs[i])
        return out

    def _record(self, row_spans: list[list[torch.Tensor]], tokens: list[int], step: int, probs: torch.Tensor) -> None:
        """Store ``probs (V,)`` as step ``step`` of the row's latest span (idempotent: a finished row whose
        constrain is still called overwrites rather than grows)."""
        index = sum(1 for t in tokens if t == self.mt_start_id) - 1
        while len(row_spans) <= index:
            row_spans.append([])
        span = row_spans[index]
        if len(span) == step:
            span.append(probs)
        elif len(span) > step:
            span[step] = probs

    def _spans(self, tokens: list[int]) -> list[list[int]]:
        """Code indices of each ``<mt_start>`` span in ``tokens`` (a span ends at ``<mt_end>`` or a non-code)."""
        spans: list[list[int]] = []
        inside = False
        for token in tokens:
            if token == self.mt_start_id:
                spans.append([])
                inside = True
            elif inside and token in self._code_of:
                spans[-1].append(self._code_of[token])
            else:
                inside = False
        return spans

    def decode(self, session: "DecodeSession") -> list[list[MaskPrediction]]:
        """Soft-decode every span (its recorded distributions; one-hot of the emitted codes for any step not
        recorded) from its first ``keep_tokens`` codes, all spans of a length in one decoder pass."""
        keep = self.keep_tokens(session.options)
        recorded = session.state.get(STATE_KEY, {}).get("probs")
        jobs: dict[int, list[tuple[int, int, torch.Tensor, list[int]]]] = {}  # span length -> (row, slot, probs, codes)
        results: list[list[MaskPrediction | None]] = [[] for _ in range(session.batch_size)]
        side = self.mask_tokenizer.config.mask_size
        for row, tokens in enumerate(session.tokens):
            for j, codes in enumerate(self._spans(tokens)):
                results[row].append(None)
                if not codes:  # the text budget ended right at <mt_start>: nothing to decode
                    results[row][j] = MaskPrediction(torch.full((side, side), -1e4, device=session.device),
                                                     {"keep_tokens": 0, "mask_tokens": [], "truncated": True})
                    continue
                steps = recorded[row][j][: len(codes)] if recorded is not None and j < len(recorded[row]) else []
                if len(steps) < len(codes):  # steps fed without constrain (e.g. teacher-forced): their hard codes
                    hard = F.one_hot(torch.tensor(codes[len(steps):], device=session.device), self.codebook_size)
                    steps = [*steps, *hard.float()]
                probs = torch.stack([step.float() for step in steps])  # (n, V)
                jobs.setdefault(len(codes), []).append((row, j, probs, codes))
        refine = session.options.get("refine_mask", True)
        for length, items in jobs.items():
            used = min(keep, length)
            pixels = session.pixel_values[[item[0] for item in items]] if refine else None
            logits = self.decode_probs(torch.stack([item[2] for item in items]), used, pixels)
            for (row, j, _, codes), mask in zip(items, logits):
                info: dict[str, Any] = {"keep_tokens": used, "mask_tokens": codes}
                if length < self.num_tokens:
                    info["truncated"] = True
                results[row][j] = MaskPrediction(mask, info)
        return results  # type: ignore[return-value]

    def answer_tokens(self, ids: list[int]) -> list[int]:
        """Each ``<mt_start> codes <mt_end>`` span -> one ``<seg>``; stray markers are dropped."""
        out: list[int] = []
        inside = False
        for token in ids:
            if token == self.mt_start_id:
                out.append(self.seg_token_id)
                inside = True
            elif token == self.mt_end_id:
                inside = False
            elif not (inside and token in self._code_of):
                inside = False
                out.append(token)
        return out
