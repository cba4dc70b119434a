"""Builders: turn a :class:`~mmseg.config.ModelConfig` into parts, and a checkpoint folder back into a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from mmseg.config import LMConfig, ModelConfig
from mmseg.modeling.grounding import GroundingGate, GroundingProbe
from mmseg.modeling.heads import build_head, head_config
from mmseg.modeling.model import CONFIG_FILE, WEIGHTS_FILE, MMSegModel
from mmseg.modeling.patch_probe import PatchProbe, probe_families
from mmseg.modeling.projector import MLPProjector, PatchMerger
from mmseg.modeling.vision import build_vision_tower
from mmseg.processing import PROCESSOR_FILE, Processor, ensure_special_tokens, train_bpe_tokenizer


class CheckpointError(ValueError):
    """A folder that is not an mmseg checkpoint, or one whose files disagree."""


def build_lm(config: LMConfig, vocab_size: int | None = None, load_weights: bool = True) -> nn.Module:
    """Any ``AutoModelForCausalLM``: from the inlined config of a checkpoint, a hub id / local folder, or tiny."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.hf_config is not None:
        hf_config = AutoConfig.for_model(**config.hf_config)
        return AutoModelForCausalLM.from_config(hf_config, attn_implementation=config.attn_implementation)
    if config.name is not None:
        if load_weights:
            return AutoModelForCausalLM.from_pretrained(config.name, attn_implementation=config.attn_implementation)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.name), attn_implementation=config.attn_implementation)
    hf_config = AutoConfig.for_model(
        config.model_type,
        vocab_size=vocab_size or 1024,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=config.attn_implementation)


def head_special_tokens(config: ModelConfig) -> list[str]:
    cls, options = head_config(config.head)
    return cls.special_tokens_for(options)


def build_tokenizer(config: ModelConfig, corpus: Iterable[str] | None = None, vocab_size: int = 1024):
    """The tokenizer a config asks for: a named one, the LM's own, or (tiny LMs) a byte-level BPE trained on
    ``corpus``. Our control tokens and the head's tokens are added in every case."""
    from transformers import AutoTokenizer

    extra = head_special_tokens(config)
    source = config.tokenizer or config.lm.name
    if source is not None:
        tokenizer = AutoTokenizer.from_pretrained(source)
        ensure_special_tokens(tokenizer, extra)
        return tokenizer
    if corpus is None:
        raise ValueError("a tiny LM without a named tokenizer needs a text corpus to train its byte-level BPE")
    return train_bpe_tokenizer(corpus, vocab_size, extra)


def build_model(config: ModelConfig, tokenizer, load_weights: bool = True, asset_dir: Path | None = None) -> tuple[MMSegModel, Processor]:
    """Parts from a config, joined. ``load_weights=False`` builds architectures only (for checkpoint reloads)."""
    vision = build_vision_tower(config.vision, load_weights=load_weights)
    lm = build_lm(config.lm, vocab_size=len(tokenizer), load_weights=load_weights)
    if lm.get_input_embeddings().num_embeddings != len(tokenizer):
        # New rows start at the mean of the existing ones (transformers' mean_resizing), so new tokens begin
        # as "average" tokens rather than random outliers.
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=load_weights and config.lm.name is not None)
    hidden = lm.config.get_text_config().hidden_size
    merger = PatchMerger(hidden, vision.grid_size, config.image_merge) if config.image_merge > 1 else None
    prefix_tokens = merger.num_tokens if merger is not None else vision.num_patches
    processor = Processor(tokenizer, vision.image_size, prefix_tokens, config.vision.mean, config.vision.std,
                          config.image_position)
    head = build_head(config.head, hidden_size=hidden, image_size=vision.image_size, grid_size=vision.grid_size,
                      asset_dir=asset_dir,
                      prefix_grid=(vision.grid_size[0] // config.image_merge, vision.grid_size[1] // config.image_merge))
    scale = None
    if config.projector_norm:  # the RMS of the LM's token embeddings, which image features should match
        scale = float(lm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
    projector = MLPProjector(vision.hidden_size, hidden, out_scale=scale)
    families = probe_families(config.patch_labels, config.patch_size_bins)
    probe = PatchProbe(hidden, families) if families else None
    grounder = None
    if config.ground_layer is not None:
        layers = lm.config.get_text_config().num_hidden_layers
        if not 1 <= config.ground_layer <= layers:
            raise ValueError(f"ground_layer must be in 1..{layers} (the LM's layers), got {config.ground_layer}")
        if config.image_position != "after":
            raise ValueError('ground_layer needs image_position "after": image positions must see the request')
        if not hasattr(lm.get_decoder(), "layers"):
            raise ValueError(f"ground_layer needs an LM whose decoder lists its layers ({type(lm).__name__} does not)")
        if config.ground_presence and not config.ground_gate:
            raise ValueError("ground_presence needs ground_gate: the presence is read off the gate's scores")
        grounder = (GroundingGate(hidden, config.ground_layer, presence=config.ground_presence) if config.ground_gate
                    else GroundingProbe(hidden, config.ground_layer))
    model = MMSegModel(config, vision, projector, lm, head, processor.image_token_id, merger=merger, probe=probe,
                       grounder=grounder)
    head.bind(processor, lm)
    return model, processor


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _checkpoint_config(folder: Path) -> ModelConfig:
    """The model config of checkpoint ``folder``, after checking that the folder is one."""
    expected = f"expected a folder with {CONFIG_FILE}, {WEIGHTS_FILE}, {PROCESSOR_FILE} and tokenizer files"
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder not found: {folder} ({expected})")
    if not folder.is_dir():
        raise CheckpointError(f"not a checkpoint folder: {folder} is a file ({expected})")
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE, PROCESSOR_FILE) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not an mmseg checkpoint: missing {missing} ({expected})")
    try:
        payload = json.loads((folder / CONFIG_FILE).read_text())
        if payload.get("architecture") != "MMSegModel":
            raise CheckpointError(f"{folder / CONFIG_FILE} is not an mmseg config (architecture={payload.get('architecture')!r})")
        return ModelConfig.from_dict(payload["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} is unreadable: {err}") from None


def _load_weights(model: MMSegModel, folder: Path, device: str | torch.device) -> None:
    """Fill ``model`` from ``folder``'s safetensors weights; every key and shape must match."""
    from safetensors.torch import load_model

    try:
        missing_keys, unexpected = load_model(model, str(folder / WEIGHTS_FILE), strict=False, device=str(device))
    except Exception as err:  # safetensors raises several types for truncated/corrupt files; torch for shapes
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        if shapes:
            raise CheckpointError(f"weights in {folder} do not match the config: {len(shapes)} tensors differ in "
                                  f"shape (e.g. {shapes[0]})") from None
        raise CheckpointError(f"cannot read weights {folder / WEIGHTS_FILE}: {err}") from None
    if missing_keys or unexpected:
        raise CheckpointError(
            f"weights in {folder} do not match the config: {len(missing_keys)} missing "
            f"(e.g. {sorted(missing_keys)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )


def _assemble(folder: Path, config: ModelConfig, device: str | torch.device,
              asset_dir: Path | None) -> tuple[MMSegModel, Processor]:
    """A model built from ``config`` with the tokenizer and weights of checkpoint ``folder``."""
    processor = Processor.from_pretrained(folder)
    model, processor = build_model(config, processor.tokenizer, load_weights=False, asset_dir=asset_dir)
    _load_weights(model, folder, device)
    return model, processor


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> tuple[MMSegModel, Processor]:
    """Load a checkpoint folder written by ``save_pretrained`` (config, safetensors weights, tokenizer,
    processor config, head assets). Raises :class:`CheckpointError` with what is wrong and what was expected."""
    folder = Path(folder)
    model, processor = _assemble(folder, _checkpoint_config(folder), device, asset_dir=folder)
    return model.to(device).eval(), processor


def init_from_checkpoint(config: ModelConfig, folder: str | Path) -> tuple[MMSegModel, Processor]:
    """The start of a fine-tuning run: a model built from ``config`` (a preset, e.g. with other training options for
    its head; its own head assets) holding the tokenizer and weights of checkpoint ``folder``. The architectures
    must match: a :class:`CheckpointError` names the tensors that differ. Returned on the CPU in training mode."""
    folder = Path(folder)
    _checkpoint_config(folder)  # a clear error when the folder is not a checkpoint
    model, processor = _assemble(folder, config, "cpu", asset_dir=None)
    return model.train(), processor
