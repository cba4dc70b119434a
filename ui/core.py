"""What the app does, without Gradio: check inputs, pick a head, ask the Segmenter, keep the answer.

Everything here uses only mmseg's public API (``Segmenter``, ``Answer``, ``mmseg.imageio``, ``mmseg.masks``).
Errors a person can fix are :class:`UserError` with a sentence that says how; the Gradio layer shows them.

Sizes (decided here, documented in ``ui/SPACE_README_FRONTMATTER.md``):

* uploads larger than :data:`WORK_SIDE` px on a side are downscaled to it before the model sees them (the
  model letterboxes to a few hundred pixels anyway, so nothing is lost) and a note says so;
* masks handed to API clients and written to downloads are always at the ORIGINAL upload size: the COCO RLE
  is computed run by run from the working-size mask (:func:`rle_at_size`), so a 10000x10000 upload never
  allocates a full-size mask; a PNG download is written at the original size up to :data:`MAX_PNG_PIXELS`
  and at the working size above (noted);
* images over :data:`mmseg.imageio.MAX_PIXELS` pixels are refused with a clear message.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from mmseg.imageio import MAX_PIXELS, ImageError, load_image
from mmseg.masks import encode_rle

WORK_SIDE = 2048  # longest side the model is handed; larger uploads are downscaled (with a note)
MAX_CHARS = 2000  # longest user message; longer ones are cut (with a note)
MAX_PNG_PIXELS = 40_000_000  # above this a mask PNG is written at the working size instead
MAX_KEEP_TOKENS = 32
HEAD_ORDER = ("stamp", "himtok", "shaper")  # the first loaded head is the default


class UserError(ValueError):
    """An input the person can fix; ``str(err)`` says how."""


# -- heads --------------------------------------------------------------------------------------------------
class Heads:
    """The loaded segmenters by display name (``Segmenter.head_name``; ``name (folder)`` when two share one)."""

    def __init__(self, segmenters: Any) -> None:
        if isinstance(segmenters, Mapping):
            items = list(segmenters.items())
        else:
            seq = list(segmenters) if isinstance(segmenters, (list, tuple)) else [segmenters]
            items, seen = [], {}
            for seg in seq:
                name = seg.head_name
                seen[name] = seen.get(name, 0) + 1
                items.append((name if seen[name] == 1 else f"{name} #{seen[name]}", seg))
        if not items:
            raise ValueError("no segmenter given: load at least one model")
        self._by_name: dict[str, Any] = dict(items)
        self.names: list[str] = [name for name, _ in items]

    @property
    def default(self) -> str:
        return self.names[0]

    def get(self, name: str | None) -> tuple[str, Any]:
        """``(name, segmenter)``; an empty name means the default (first) head."""
        if name is None or (isinstance(name, str) and not name.strip()):
            name = self.default
        if not isinstance(name, str) or name.strip() not in self._by_name:
            raise UserError(f"Unknown head {name!r}. Loaded heads: {', '.join(self.names)}.")
        name = name.strip()
        return name, self._by_name[name]

    def takes_tokens(self, name: str | None) -> bool:
        """Whether the head decodes coarse-to-fine mask tokens (``keep_tokens`` applies)."""
        try:
            _, seg = self.get(name)
        except UserError:
            return False
        return "keep_tokens" in getattr(seg, "head_options", ())

    def default_probability(self, name: str | None = None) -> float:
        """The head's own mask threshold as a probability (``Segmenter.threshold`` is a logit)."""
        _, seg = self.get(name)
        return logit_to_probability(float(getattr(seg, "threshold", 0.0)))


def head_sort_key(head_name: str) -> int:
    name = head_name.lower()
    return HEAD_ORDER.index(name) if name in HEAD_ORDER else len(HEAD_ORDER)


def logit_to_probability(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


def probability_to_logit(p: float) -> float:
    p = min(max(float(p), 1e-4), 1.0 - 1e-4)
    return math.log(p / (1.0 - p))


# -- inputs -------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """An upload made ready for the model: ``image`` is RGB at most WORK_SIDE px on a side."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) of the upload
    notes: list[str] = field(default_factory=list)

    @property
    def downscaled(self) -> bool:
        return self.image.size != self.original_size


def prepare_image(image: Any) -> Prepared:
    """Check and load an upload (path, PIL image or array) -> :class:`Prepared`; raises :class:`UserError`."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise UserError("No image yet: upload one, paste one, take one with the webcam or pick an example.")
    if isinstance(image, dict) and "path" in image:  # a FileData-like dict from an API client
        image = image["path"]
    if isinstance(image, (str, Path)):
        _check_file(Path(image))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil = load_image(image)
    except ImageError as err:
        raise UserError(f"That upload is not an image I can use: {err}") from None
    except Image.DecompressionBombError:
        raise UserError(f"The image is too large: the limit is {MAX_PIXELS:,} pixels.") from None
    except MemoryError:
        raise UserError("The image is too large to decode on this machine.") from None
    width, height = pil.size
    notes = []
    if max(width, height) > WORK_SIDE:
        scale = WORK_SIDE / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pil = pil.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        notes.append(f"The image ({width}x{height}) was downscaled to {size[0]}x{size[1]} for the model; "
                     f"masks are returned at {width}x{height}.")
    return Prepared(pil, (width, height), notes)


def _check_file(path: Path) -> None:
    """Read only the header: refuse non-images and over-large images before decoding any pixels."""
    if not path.is_file():
        raise UserError(f"The image file is missing: {path.name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
    except Image.DecompressionBombError:
        raise UserError(f"The image is too large: the limit is {MAX_PIXELS:,} pixels.") from None
    except Exception:
        raise UserError(f"That upload ({path.suffix or 'no extension'}) is not an image I can read: "
                        "use a PNG, JPEG, WebP, GIF, BMP or TIFF file.") from None
    if width * height > MAX_PIXELS:
        raise UserError(f"The image is {width}x{height} = {width * height:,} pixels; the limit is "
                        f"{MAX_PIXELS:,} pixels.")


def clean_message(text: Any) -> tuple[str, list[str]]:
    """Strip, refuse an empty message, cut one longer than MAX_CHARS -> ``(text, notes)``."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise UserError("The message must be text.")
    text = text.strip()
    if not text:
        raise UserError("The message is empty: type a question or what to segment.")
    if len(text) > MAX_CHARS:
        return text[:MAX_CHARS], [f"Your message had {len(text):,} characters; only the first "
                                  f"{MAX_CHARS:,} were used."]
    return text, []


def clean_history(history: Any) -> list[dict]:
    """Earlier turns from an API client: a list of ``{"role": "user"|"assistant", "content": str}``."""
    if history in (None, "", []):
        return []
    if isinstance(history, str):
        import json

        try:
            history = json.loads(history)
        except ValueError:
            raise UserError("history must be a JSON list of {role, content} messages.") from None
    if not isinstance(history, list):
        raise UserError("history must be a list of {role, content} messages.")
    turns = []
    for i, m in enumerate(history):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise UserError(f"history[{i}] must be {{'role': 'user'|'assistant', 'content': str}}.")
        turns.append({"role": m["role"], "content": m["content"][:MAX_CHARS]})
    if turns and turns[-1]["role"] != "assistant":
        raise UserError("history must end with the assistant's answer (the new message is sent separately).")
    return turns


def keep_tokens_option(heads: Heads, head: str, keep_tokens: Any) -> dict:
    """``{"keep_tokens": k}`` for a coarse-to-fine head when 1 <= k < 32 is asked, else ``{}``."""
    if not heads.takes_tokens(head) or keep_tokens in (None, ""):
        return {}
    try:
        k = int(keep_tokens)
    except (TypeError, ValueError):
        raise UserError("keep_tokens must be a whole number from 1 to 32.") from None
    if k <= 0 or k >= MAX_KEEP_TOKENS:
        return {}  # all tokens: the head's default
    return {"keep_tokens": k}


# -- answers ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One answer, kept so that the threshold can change without re-running the model."""

    text: str  # as the model said it, with <seg> where each mask belongs
    head: str
    messages: list[dict]  # the conversation the answer replies to (ends with the user's turn)
    image: Image.Image  # the working image
    original_size: tuple[int, int]
    logits: list[np.ndarray]  # float16 (h, w) at the working size, one per mask
    masks: list[np.ndarray]  # bool (h, w) at the working size, at the current threshold
    timings: dict[str, float]
    notes: list[str]
    info: list[dict]
    options: dict
    message_notes: list[str] = field(default_factory=list)  # notes about the user's message (e.g. cut)

    @property
    def conversation(self) -> list[dict]:
        return [*self.messages, {"role": "assistant", "content": self.text}]

    def rethreshold(self, probability: float | None) -> None:
        """Redraw the masks from the kept logits (no model call)."""
        if probability is None or len(self.logits) != len(self.masks):
            return
        t = probability_to_logit(probability)
        self.masks = [lg > t for lg in self.logits]

    def rles(self) -> list[dict]:
        """COCO RLE of each mask at the ORIGINAL upload size."""
        w, h = self.original_size
        return [rle_at_size(m, (h, w)) for m in self.masks]

    def details(self) -> dict:
        w, h = self.original_size
        scale_x, scale_y = w / self.image.width, h / self.image.height
        boxes = []
        for m in self.masks:
            ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
            boxes.append(None if xs.size == 0 else [round(float(xs[0]) * scale_x, 1), round(float(ys[0]) * scale_y, 1),
                                                    round(float(xs[-1] + 1) * scale_x, 1),
                                                    round(float(ys[-1] + 1) * scale_y, 1)])
        return {
            "head": self.head,
            "image_size": [h, w],
            "model_image_size": [self.image.height, self.image.width],
            "boxes": boxes,
            "timings_ms": {k: round(float(v), 1) for k, v in self.timings.items()},
            "notes": list(self.notes),
            "history": self.conversation,
        }


def answer(heads: Heads, head: str | None, prepared: Prepared, history: Sequence[dict], message: str,
           options: dict | None = None, probability: float | None = None, notes: Sequence[str] = ()) -> Result:
    """Ask head ``head`` about ``prepared`` with ``history`` + the new user ``message``."""
    name, seg = heads.get(head)
    messages = [*history, {"role": "user", "content": message}]
    try:
        reply = seg.chat(messages, prepared.image, **(options or {}))
    except ImageError as err:
        raise UserError(f"That upload is not an image I can use: {err}") from None
    except ValueError as err:  # the Segmenter's own checks (empty query, malformed turns)
        raise UserError(str(err)) from None
    logits = [np.asarray(lg, dtype=np.float16) for lg in (reply.logits or [])]
    masks = [np.asarray(m, dtype=bool) for m in reply.masks]
    result = Result(
        text=reply.text, head=name, messages=messages, image=prepared.image, original_size=prepared.original_size,
        logits=logits if len(logits) == len(masks) else [], masks=masks, timings=dict(reply.timings),
        notes=[*notes, *prepared.notes, *reply.notes], info=list(reply.info), options=dict(options or {}),
        message_notes=list(notes),
    )
    if probability is not None and abs(probability_to_logit(probability) - float(seg.threshold)) > 1e-6:
        result.rethreshold(probability)
    return result


# -- masks at the original size -----------------------------------------------------------------------------
def _nearest_index(out_len: int, in_len: int) -> np.ndarray:
    # pixel-centre nearest neighbour, the rule of mmseg.masks.resize_mask
    return np.minimum(((np.arange(out_len) + 0.5) * in_len / out_len).astype(np.int64), in_len - 1)


def rle_at_size(mask: np.ndarray, size: tuple[int, int]) -> dict:
    """COCO RLE of ``mask`` (bool (h, w)) resized nearest-neighbour to ``size`` = (H, W), computed from runs so
    that the (H, W) mask is never built. Equals ``encode_rle(resize_mask(mask, size))``."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return encode_rle(mask)
    from pycocotools import mask as mask_utils

    rows, cols = _nearest_index(H, h), _nearest_index(W, w)
    kept_rows, first = np.unique(rows, return_index=True)  # rows is sorted: first output row of each kept row
    sub = mask[kept_rows]  # (k, w)
    flips = sub[1:] != sub[:-1]  # (k-1, w): value changes between consecutive kept rows
    within = [first[1:][flips[:, c]] for c in range(w)]  # change offsets inside an output column
    starts = []
    previous = False  # COCO RLE starts with a run of zeros
    for x, c in enumerate(cols):
        base = x * H
        if sub[0, c] != previous:
            starts.append(np.array([base], dtype=np.int64))
        if within[c].size:
            starts.append(base + within[c])
        previous = bool(sub[-1, c])
    changes = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.concatenate([[0], changes, [H * W]])).astype(np.int64)
    rle = mask_utils.frPyObjects({"size": [H, W], "counts": counts.tolist()}, H, W)
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
