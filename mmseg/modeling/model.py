"""MMSegModel: vision tower -> projector -> causal LM, plus one mask head. Parts come in through the constructor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmseg.config import ModelConfig
from mmseg.modeling.grounding import GroundingProbe, focus_loss
from mmseg.modeling.heads.base import ExtraInputs, MaskHead
from mmseg.modeling.losses import answer_cross_entropy
from mmseg.modeling.patch_probe import PatchProbe
from mmseg.modeling.projector import MLPProjector, PatchMerger
from mmseg.modeling.vision import VisionTower

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def causal_text_attention(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` padding mask -> ``(B, T, T)`` bool: causal over valid tokens; every row may see itself so that
    padded rows are never fully blocked (SDPA returns NaN for a row that attends nothing)."""
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=attention_mask.device)
    return (causal[None] & attention_mask.bool()[:, None, :]) | eye[None]


IMAGE_ATTENTION = ("causal", "bidirectional")


def open_image_block(rows: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """``rows (B, Q, K)`` bool attention over the last ``K`` slots, ``image_positions (B, K)`` bool -> ``rows`` with
    every image position free to attend to every image position of its row (``Q == K``: a whole-sequence pass)."""
    return rows | (image_positions[:, :, None] & image_positions[:, None, :])


class MMSegModel(nn.Module):
    """The LLaVA-style backbone with a mask head.

    ``forward(batch)`` returns the training losses; inference goes through :mod:`mmseg.generation`.
    Batch keys: ``input_ids (B, T)``, ``attention_mask (B, T)``, ``labels (B, T)`` (-100 = no loss),
    ``pixel_values (B, 3, S, S)``, ``mask_targets (B, S, S)`` in {0, 1}, ``seg_positions (B,)`` (-1 = none);
    optional ``patch_labels (B, F, S, S)`` long (see :class:`~mmseg.modeling.patch_probe.PatchProbe`);
    optional ``focus_targets (B, S, S)`` in {0, 1} with ``focus_valid (B,)`` bool (see
    :class:`~mmseg.modeling.grounding.GroundingProbe`).
    """

    def __init__(self, config: ModelConfig, vision: VisionTower, projector: MLPProjector, lm: nn.Module,
                 head: MaskHead, image_token_id: int, merger: PatchMerger | None = None,
                 probe: PatchProbe | None = None, grounder: GroundingProbe | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.head = head
        self.image_token_id = image_token_id
        self.merger = merger  # optional: fewer image positions in the LM prefix than patches
        self.probe = probe  # optional: dense attribute supervision of the patch features (training only)
        self.probe_weight = 0.5  # set by the trainer from its config
        self.grounder = grounder  # optional: the LM's image positions predict the answer's focus (training only)
        self.ground_weight = 1.0  # set by the trainer from its config
        self.vision_grad_scale = 1.0  # set by the trainer from its config
        self.decision_weight = 1.0  # set by the trainer from its config (TrainConfig.decision_weight)
        self.text_weight = 1.0  # set by the trainer from its config (TrainConfig.text_weight)
        self._image_positions: torch.Tensor | None = None  # (B, Q) for the decoder pass in flight (the grounder's hook)
        if config.image_attention not in IMAGE_ATTENTION:
            raise ValueError(f"image_attention must be one of {IMAGE_ATTENTION}, got {config.image_attention!r}")
        self._hooks = []
        if grounder is not None:
            # The grounder reads (and a gate writes) the LM's stream after its layer; a hook keeps any
            # AutoModelForCausalLM unmodified.
            self._hooks.append(self.decoder.layers[grounder.layer - 1].register_forward_hook(self._ground_hook))

    def unhook(self) -> None:
        """Take this model's and its head's hooks off the LM, for a new model built on the same parts (the shaper
        on a HiMTok model); this model must not be used afterwards."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.head.unhook()

    @property
    def decoder(self) -> nn.Module:
        """The LM without its output layer: gives normalised last hidden states."""
        return self.lm.get_decoder()

    @property
    def prefix_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the image positions in the LM prefix (the patch grid, or the merged grid)."""
        (gh, gw), m = self.vision.grid_size, self.config.image_merge
        return gh // m, gw // m

    def _ground_hook(self, module: nn.Module, args, output):
        if self._image_positions is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = self.grounder.apply(hidden, self._image_positions, self.prefix_grid)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def run_decoder(self, embeds: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                    image_positions: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The LM's decoder over ``embeds (B, Q, D)`` with a bool ``attention (B, 1, Q, K)`` (True = may attend;
        ``K`` counts cached positions too) at ``positions (B, Q)``; returns the last hidden states ``(B, Q, D)``.
        ``image_positions (B, Q)`` bool marks the image tokens among ``embeds`` (each row all of them, or none in the
        whole batch): the grounder (:mod:`mmseg.modeling.grounding`) scores them, and a gate writes back. Pass it
        whenever the image is in ``embeds``.

        transformers passes a 4-D mask through unchanged: SDPA reads a bool mask, but eager attention *adds* the
        mask to its scores, so for eager it becomes 0 / dtype-min in the embeddings' dtype.
        """
        if getattr(self.lm.config, "_attn_implementation", "sdpa") == "eager":
            attention = torch.zeros(attention.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~attention, torch.finfo(embeds.dtype).min)
        ground = self.grounder is not None and image_positions is not None and bool(image_positions.any())
        self._image_positions = image_positions if ground else None
        try:
            return self.decoder(inputs_embeds=embeds, attention_mask=attention, position_ids=positions,
                                **kwargs).last_hidden_state
        finally:
            self._image_positions = None

    def text_hidden(self, embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    extra: ExtraInputs | None = None) -> torch.Tensor:
        """Teacher-forced last hidden states ``(B, T + Q, D)`` of a text batch ``input_ids (B, T)`` whose ``embeds
        (B, T, D)`` carry the image (see :meth:`embed_inputs`): causal text, the image block as configured, the
        grounder on; then the head's ``extra`` positions (``Q`` of them, none by default), which text never sees.
        No cache."""
        b, t = input_ids.shape
        image = input_ids == self.image_token_id
        rows = self.text_attention(attention_mask, image)  # (B, T, T)
        positions = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        if extra is not None:
            q = extra.embeds.shape[1]
            rows = torch.cat([F.pad(rows, (0, q), value=False), extra.attention], dim=1)  # text never sees extras
            embeds = torch.cat([embeds, extra.embeds.to(embeds.dtype)], dim=1)
            positions = torch.cat([positions, extra.position_ids], dim=1)
        return self.run_decoder(embeds, rows[:, None], positions, use_cache=False,
                                image_positions=F.pad(image, (0, embeds.shape[1] - t)))

    def text_attention(self, attention_mask: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
        """``attention_mask (B, T)`` padding mask, ``image_positions (B, T)`` bool -> ``(B, T, T)`` bool: causal
        over valid tokens, and bidirectional among the image positions when ``config.image_attention`` says so."""
        rows = causal_text_attention(attention_mask)
        return open_image_block(rows, image_positions) if self.bidirectional_image else rows

    @property
    def bidirectional_image(self) -> bool:
        return self.config.image_attention == "bidirectional"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S) -> (B, P, D)`` projected patch features (one per patch; what heads receive)."""
        return self.projector(self.vision(pixel_values))

    def prefix_features(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, P, D)`` patch features -> ``(B, P', D)`` the features placed in the LM prefix (``P' = P`` unless
        the config merges patches)."""
        return features if self.merger is None else self.merger(features)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with image features scattered into the ``<image>`` placeholders.

        Pass ``pixel_values (B, 3, S, S)`` or precomputed ``features (B, P, D)``.
        Returns ``(inputs_embeds (B, T, D), image_features (B, P, D))`` (the per-patch features, not merged).
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        if features is None:
            features = self.image_features(pixel_values)
        features = features.to(embeds.dtype)
        prefix = self.prefix_features(features).to(embeds.dtype)  # autocast may run the merger in bf16
        placeholders = input_ids == self.image_token_id  # (B, T)
        counts = placeholders.sum(1)
        if bool((counts != prefix.shape[1]).any()):
            raise ValueError(
                f"image placeholder count {counts.tolist()} does not match the {prefix.shape[1]} image tokens per "
                "row; the processor must expand <image> to one placeholder per image token"
            )
        embeds = embeds.masked_scatter(placeholders[..., None].expand_as(embeds), prefix)
        return embeds, features

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, attention = batch["input_ids"], batch["attention_mask"]
        t = input_ids.shape[1]
        features = self.image_features(batch["pixel_values"])
        if self.probe is not None and self.vision_grad_scale != 1.0:
            # What the LM and the head pass back into the image features is scaled down; the probe's is not (see
            # TrainConfig.vision_grad_scale). Same values forward.
            shared = features.detach() + self.vision_grad_scale * (features - features.detach())
        else:
            shared = features
        embeds, _ = self.embed_inputs(input_ids, features=shared)
        extra = self.head.extra_inputs(batch, shared)
        hidden = self.text_hidden(embeds, input_ids, attention, extra)
        text_hidden = hidden[:, :t]
        logits = self.lm.get_output_embeddings()(text_hidden)
        labels = batch["labels"]
        text_ce = answer_cross_entropy(logits, self.head.text_labels(labels), self.decision_weight)
        losses = {"text_ce": self.text_weight * text_ce}
        losses.update(self.head.loss(batch, text_hidden, logits, hidden[:, t:] if extra is not None else None))
        if self.probe is not None and "patch_labels" in batch:
            losses["patch_probe"] = self.probe_weight * self.probe.loss(features, batch["patch_labels"],
                                                                        self.vision.grid_size)
        if self.grounder is not None and "focus_targets" in batch:
            losses["grounding"] = self.ground_weight * focus_loss(self.grounder.last_logits, batch["focus_targets"],
                                                                  batch["focus_valid"])
        losses["loss"] = sum(losses.values())
        return losses

    # -- persistence ------------------------------------------------------------------------------------
    def saved_config(self) -> ModelConfig:
        """This model's config with the full LM/vision configs inlined, so reloading never needs the hub."""
        lm = dataclasses.replace(self.config.lm, hf_config=self.lm.config.to_dict())
        vision = self.vision.saved_config(self.config.vision)
        return dataclasses.replace(self.config, lm=lm, vision=vision, head=self.head.options())

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` (in ``dtype`` when given, e.g. ``torch.bfloat16`` to halve
        the file; reloading casts back to the model's dtype) and the head's assets."""
        import copy

        from safetensors.torch import save_model

        from mmseg import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"mmseg_version": __version__, "architecture": "MMSegModel", "model": self.saved_config().to_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2, default=list))
        to_save = self
        if dtype is not None:
            # float64 tensors are running statistics kept in float64 on purpose (the shaper invoker's input
            # standardisation counts ~10^5 decisions): they stay float64, every other float tensor takes ``dtype``
            to_save = copy.deepcopy(self)
            for tensor in (*to_save.parameters(), *to_save.buffers()):
                if tensor.is_floating_point() and tensor.dtype != torch.float64:
                    tensor.data = tensor.data.to(dtype)
        save_model(to_save, str(folder / WEIGHTS_FILE))  # handles tied embeddings
        self.head.save_assets(folder)
