"""The mask-head contract: the only thing the model, the decode loop, the evaluator and the UI know about a head.

``<seg>`` is the universal mask placeholder in answer text. Each head says how ``<seg>`` is realised:

- at training time, ``expand_targets`` rewrites one sample's token ids (e.g. HiMTok puts its 32 mask tokens
  there), ``extra_inputs`` may append positions after the text (e.g. STAMP's mask queries), and ``loss`` adds
  the head's own terms to the shared text cross-entropy;
- a head may own its whole training (``trainer``; e.g. the shaper's two stages on a frozen HiMTok model);
- at inference, ``mask_point_token_id`` is the generated token that opens a mask point (``<seg>`` unless the
  head realises it differently), ``constrain`` may restrict next-token logits, ``in_mask_span`` marks steps the
  head dictates (not counted toward the text budget), ``after_step`` may revise the hidden state of the token
  just fed, and ``decode`` turns the finished :class:`~mmseg.generation.DecodeSession` into one
  :class:`MaskPrediction` per mask point; ``answer_tokens`` renders the head's realisation back as ``<seg>``
  for the answer text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from mmseg.generation import DecodeSession


@dataclass
class MaskPrediction:
    """One predicted mask. ``logits`` is ``(h, w)`` float over the model's SQUARE input (letterbox included);
    the predictor maps it to the original image size. ``info`` carries head-specific facts for the answer
    (e.g. how many tokens were kept, or when a shaper invoked)."""

    logits: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtraInputs:
    """Positions a head appends after the (padded) text during training.

    ``embeds (B, Q, D)``; ``attention (B, Q, T + Q)`` bool, True = may attend (rows for text never see these
    positions); ``position_ids (B, Q)``.
    """

    embeds: torch.Tensor
    attention: torch.Tensor
    position_ids: torch.Tensor


class MaskHead(nn.Module):
    """Base class of every mask head.

    Built as ``Head(config, hidden_size=, image_size=, grid_size=, asset_dir=, prefix_grid=)``: the LM width, the
    square input side, the vision tower's patch grid, a checkpoint folder holding the head's own files (None when
    built from a preset), and the grid of image positions in the LM prefix (``grid_size`` divided by the model's
    ``image_merge``)."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    # Per-call options the head accepts (e.g. ``keep_tokens``); an instance may narrow its class's list to what
    # its config built (HiMTok offers ``refine_mask`` only with a refiner).
    option_names: tuple[str, ...] = ()
    mask_point_token_id: int  # set by bind(): the generated token that opens a mask point
    seg_token_id: int  # set by bind(): the shared <seg> placeholder

    @classmethod
    def special_tokens_for(cls, config: Any) -> list[str]:
        """Tokens a head with this config adds to the vocabulary (besides the shared ``<seg>``). A classmethod
        because the tokenizer is made before the head is built."""
        return []

    def special_tokens(self) -> list[str]:
        return self.special_tokens_for(self.config)  # type: ignore[attr-defined]

    def bind(self, processor: Any, lm: nn.Module) -> None:
        """Called once the tokenizer and LM exist: look up token ids, initialise new embedding rows.

        Subclasses call ``super().bind`` first; by default a mask point opens at ``<seg>``."""
        self.seg_token_id = processor.seg_token_id
        self.mask_point_token_id = processor.seg_token_id

    def unhook(self) -> None:
        """Remove any hooks :meth:`bind` put on the LM (another head is taking the LM over). Default: none."""

    def host_targets(self) -> None:
        """Training, before the model moves to an accelerator: make :meth:`expand_targets` independent of the
        model's device, so that forked DataLoader workers (which cannot use the parent's accelerator) can build
        targets. Default: nothing to do (the targets need no model part)."""

    def expand_targets(self, input_ids: list[int], labels: list[int], mask: torch.Tensor | None,
                       rng: random.Random | None = None) -> tuple[list[int], list[int]]:
        """Training: rewrite one sample's ids/labels where ``<seg>`` stands. ``mask`` is ``(S, S)`` in {0,1} or None.
        ``rng``: the sample's own generator for anything drawn at random (the trainer keys it by step and sample);
        None: the head's own draws."""
        return input_ids, labels

    def extra_inputs(self, batch: dict[str, torch.Tensor], image_features: torch.Tensor) -> ExtraInputs | None:
        """Training: positions appended after the text (None when the head needs none)."""
        return None

    def loss(self, batch: dict[str, torch.Tensor], text_hidden: torch.Tensor, text_logits: torch.Tensor,
             extra_hidden: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The head's weighted loss terms; the model adds the text cross-entropy."""
        raise NotImplementedError

    def text_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Training: the labels ``(B, T)`` the model's text cross-entropy scores (-100 = not scored). All of them by
        default; a head whose own loss trains some answer tokens may leave them out."""
        return labels

    @classmethod
    def trainer(cls) -> Callable[..., dict] | None:
        """Training: a head that trains differently from the shared loop in :mod:`mmseg.train` (e.g. in stages on a
        frozen backbone) returns its own ``train(preset, data_dir, out_dir, max_minutes=None, max_steps=None,
        progress=True) -> summary dict``, which ``mmseg train`` runs instead. None (the default): the shared loop."""
        return None

    def check_options(self, options: dict[str, Any]) -> None:
        """Generation: reject bad per-call options (e.g. ``keep_tokens``) with a ValueError before any work."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            valid = ", ".join(self.option_names) or "none"
            raise ValueError(f"unknown option(s) {unknown} for the {self.name} head; valid: {valid}")

    def constrain(self, session: "DecodeSession", logits: torch.Tensor) -> torch.Tensor:
        """Generation: adjust next-token logits ``(B, V)`` (identity by default). Called once per step, before
        the greedy choice, so a head may also record per-step state in ``session.state``."""
        return logits

    def in_mask_span(self, session: "DecodeSession") -> torch.Tensor:
        """Generation: ``(B,)`` bool, rows whose next token belongs to the head's own realisation of a mask
        (e.g. HiMTok's code tokens). Such steps do not count toward ``max_new_tokens``, so a mask is never cut
        off by the text budget. None by default."""
        return torch.zeros(session.batch_size, dtype=torch.bool, device=session.device)

    def after_step(self, session: "DecodeSession", hidden: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Generation: called after each fed token ``chosen (B,)`` with its last hidden state ``hidden (B, 1, D)``;
        returns the hidden state the next logits are read from. Identity by default.

        The hook for heads that steer decoding: one may add a control vector to the input embedding of the token
        just fed and re-run that one position with :meth:`DecodeSession.replace_last`, which overwrites its KV
        entries (the cache length is unchanged), then return the new hidden state."""
        return hidden

    def answer_tokens(self, ids: list[int]) -> list[int]:
        """Generated ids -> ids as the answer text shows them: the head's realisation of each mask point is
        rendered as ``<seg>`` (identity by default)."""
        return list(ids)

    def decode(self, session: "DecodeSession") -> list[list[MaskPrediction]]:
        """Inference: one list of masks per row, one mask per ``<seg>`` (or the head's equivalent) it emitted."""
        raise NotImplementedError

    def save_assets(self, folder: Path) -> None:
        """Write files the head needs besides its weights (e.g. a mask tokenizer)."""

    def options(self) -> dict[str, Any]:
        """The head's config as a dict (stored in the model config)."""
        import dataclasses

        return {"name": self.name, **dataclasses.asdict(self.config)}  # type: ignore[attr-defined]


HEADS: dict[str, type[MaskHead]] = {}


def register_head(cls: type[MaskHead]) -> type[MaskHead]:
    """Class decorator adding a head to :data:`HEADS` under ``cls.name``."""
    HEADS[cls.name] = cls
    return cls


def list_heads() -> list[str]:
    return sorted(HEADS)


def head_config(options: dict[str, Any]) -> tuple[type[MaskHead], Any]:
    """Validate ``{"name": ..., **options}`` -> (head class, its config dataclass)."""
    from mmseg.config import _from_dict

    options = dict(options)
    name = options.pop("name", None)
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid heads: {', '.join(list_heads())}")
    cls = HEADS[name]
    return cls, _from_dict(cls.config_cls, options, f"head {name}")


def build_head(options: dict[str, Any], hidden_size: int, image_size: int, grid_size: tuple[int, int],
               asset_dir: Path | None = None, prefix_grid: tuple[int, int] | None = None) -> MaskHead:
    """Build the head ``options["name"]`` names, validating its options against the head's config class.

    ``grid_size``: the vision tower's patch grid; ``prefix_grid``: the grid of image positions in the LM prefix
    (smaller than ``grid_size`` when patches are merged; default the same)."""
    cls, config = head_config(options)
    factory: Callable[..., MaskHead] = cls
    return factory(config, hidden_size=hidden_size, image_size=image_size, grid_size=grid_size, asset_dir=asset_dir,
                   prefix_grid=prefix_grid or grid_size)
