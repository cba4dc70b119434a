"""Segmenter: the public API that the UI, the evaluator and the CLI use.

>>> seg = Segmenter.from_pretrained("checkpoints/synthref-stamp")
>>> answer = seg("photo.png", "Please segment the red circle.")
>>> answer.text, answer.masks[0].shape  # masks are bool arrays at the ORIGINAL image size
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mmseg.imageio import ImageLike, load_image
from mmseg.masks import mask_to_box
from mmseg.processing import Letterbox, Processor


@dataclass
class Answer:
    """One reply. ``masks``: bool ``(H, W)`` arrays at the original image size, one per mask the answer
    refers to (empty list when it refers to none); ``boxes``: XYXY pixel boxes of those masks (None for an
    empty mask); ``timings``: milliseconds per stage; ``info``: head-specific facts per mask."""

    text: str
    masks: list[np.ndarray] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float] | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list, repr=False)  # float (H, W) per mask, for re-thresholding


def logits_to_original(logits: torch.Tensor, box: Letterbox, side: int) -> torch.Tensor:
    """Mask logits ``(h, w)`` over the square model input -> ``(H, W)`` logits over the original image."""
    square = F.interpolate(logits[None, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    nh, nw = box.content_size
    content = square[..., box.pad_top : box.pad_top + nh, box.pad_left : box.pad_left + nw]
    return F.interpolate(content, size=box.original_size, mode="bilinear", align_corners=False)[0, 0]


class Segmenter:
    """Stateless predictor around a model and its processor (thread-safe for inference under torch's GIL-free
    kernels as long as callers do not mutate it)."""

    def __init__(self, model, processor: Processor, max_new_tokens: int = 48, threshold: float = 0.0) -> None:
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold  # logit threshold: 0.0 = probability 0.5

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, **kwargs: Any) -> "Segmenter":
        """Load a checkpoint folder (or a hub id, resolved with huggingface_hub when online)."""
        from mmseg.modeling.builder import load_pretrained

        folder = Path(path)
        if not folder.exists() and "/" in str(path) and not str(path).startswith((".", "/")):
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(path)))
        model, processor = load_pretrained(folder, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, processor, **kwargs)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """One folder with config, safetensors weights (optionally cast to ``dtype``), tokenizer, processor."""
        self.model.save_pretrained(folder, dtype=dtype)
        self.processor.save_pretrained(folder)

    @property
    def head_name(self) -> str:
        return self.model.head.name

    @property
    def head_options(self) -> tuple[str, ...]:
        """Per-call options this model's head accepts (e.g. ``("keep_tokens", "refine_mask")`` for HiMTok)."""
        return tuple(self.model.head.option_names)

    # -- queries ----------------------------------------------------------------------------------------
    def __call__(self, image: ImageLike, query: str, **options: Any) -> Answer:
        """Answer one query about one image. ``options`` go to the head (e.g. ``keep_tokens=8`` for HiMTok)."""
        return self.chat([{"role": "user", "content": query}], image, **options)

    def chat(self, messages: Sequence[dict], image: ImageLike, **options: Any) -> Answer:
        """Multi-turn: ``messages`` alternate ``{"role": "user"|"assistant", "content": str}`` and end with the
        user's new turn; the image belongs to the first turn."""
        return self.batch([messages], [image], **options)[0]

    def batch(self, conversations: Sequence[Sequence[dict]], images: Sequence[ImageLike], **options: Any) -> list[Answer]:
        """Answer several conversations at once (one image each); same results as one at a time."""
        from mmseg.generation import generate

        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} images")
        start = time.perf_counter()
        pils = [load_image(im) for im in images]
        pixels, boxes, prompts, notes = [], [], [], []
        for pil, messages in zip(pils, conversations):
            messages, note = self._check_messages(messages)
            px, box = self.processor.preprocess_image(pil)
            pixels.append(px)
            boxes.append(box)
            prompts.append(self.processor.encode_chat(messages)[0])
            notes.append(note)
        preprocess_ms = (time.perf_counter() - start) * 1000.0
        device = self.model.device
        gen = generate(
            self.model, prompts, torch.stack(pixels).to(device), eos_token_id=self.processor.eos_token_id,
            pad_token_id=self.processor.pad_token_id, max_new_tokens=self.max_new_tokens, options=options,
        )
        answers = []
        for row, (box, note) in enumerate(zip(boxes, notes)):
            start = time.perf_counter()
            masks, mask_logits, infos = [], [], []
            for pred in gen.masks[row]:
                full = logits_to_original(pred.logits, box, self.processor.image_size)
                full = full.float().cpu()  # the model may run on a GPU, in half precision
                mask_logits.append(full.numpy())
                masks.append((full > self.threshold).numpy())
                infos.append(pred.info)
            post_ms = (time.perf_counter() - start) * 1000.0
            timings = {"preprocess_ms": preprocess_ms / len(boxes), **gen.timings, "postprocess_ms": post_ms}
            timings["total_ms"] = sum(timings.values())
            answers.append(Answer(
                text=self.processor.decode(gen.text_tokens[row]), masks=masks, boxes=[mask_to_box(m) for m in masks],
                timings=timings, info=infos, notes=note, logits=mask_logits,
            ))
        return answers

    def _check_messages(self, messages: Sequence[dict]) -> tuple[list[dict], list[str]]:
        if not messages:
            raise ValueError("no messages: send at least one user message")
        checked, notes = [], []
        limit = self.model.config.max_text_tokens
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"each message must be {{'role': 'user'|'assistant', 'content': str}}, got {m!r}")
            content = m["content"]
            if m["role"] == "user":
                if not content.strip():
                    raise ValueError("the query is empty: type what to segment or ask")
                ids = self.processor.encode_user_text(content)
                if len(ids) > limit:
                    content = self.processor.tokenizer.decode(ids[:limit])
                    notes.append(f"the message was truncated to its first {limit} tokens")
            checked.append({"role": m["role"], "content": content})
        if checked[-1]["role"] != "user":
            raise ValueError("the last message must be the user's")
        return checked, notes
