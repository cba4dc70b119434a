"""How an answer looks: chat text, the overlay with labels, timings, notes and the download files."""

from __future__ import annotations

import html
import json
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from mmseg.masks import overlay, save_mask_png
from ui.core import MAX_PNG_PIXELS, Result

SEG = "<seg>"
MASK_ALPHA = 0.55  # opacity of a mask over the image
DISPLAY_SIDE = 1024  # the overlay is drawn at most this large (the browser need not get a 10000 px image)
# Same colours as mmseg.masks.overlay, so a saved overlay and the page agree.
PALETTE = ("#ff3838", "#38c8ff", "#48dc48", "#ffc800", "#c850ff", "#ff8000", "#00ffc8", "#ff64b4")
STAGES = (("preprocess_ms", "preprocess"), ("vision_ms", "vision"), ("prefill_ms", "prefill"),
          ("text_ms", "text"), ("mask_ms", "mask"), ("postprocess_ms", "postprocess"))


def mask_labels(result: Result) -> list[str]:
    """``"1: the red circle"``: the mask number and what it refers to (the query for a single mask, else the
    words of the answer right before its <seg>)."""
    n = len(result.masks)
    query = result.messages[-1]["content"] if result.messages else ""
    pieces = result.text.split(SEG)
    labels = []
    query = re.sub(r"^(please\s+)?(segment|show me|find|where is)\s+", "", query.strip(), flags=re.I).rstrip(".?!")
    for i in range(n):
        if n == 1:
            what = query
        else:
            before = pieces[i] if i < len(pieces) else ""
            what = " ".join(re.sub(r"[^\w\s-]", " ", before).split()[-4:]) or query
        what = " ".join(what.split())
        what = what if len(what) <= 40 else what[:39] + "…"
        labels.append(f"{i + 1}: {what}" if what else f"mask {i + 1}")
    return labels


def chat_text(text: str, n_masks: int | None = None) -> str:
    """Model text for the chat bubble: HTML-escaped, each <seg> shown as the mask it stands for."""
    parts = text.split(SEG)
    out = html.escape(parts[0])
    for i, part in enumerate(parts[1:]):
        out += f"**[mask {i + 1}]**" + html.escape(part)
    return out.strip() or "*(no text)*"


def user_text(text: str) -> str:
    return html.escape(text)


def chat_messages(conversation: list[dict]) -> list[dict]:
    """Raw conversation -> Chatbot messages (``{"role", "content"}``, the only format in Gradio 6)."""
    return [{"role": m["role"], "content": user_text(m["content"]) if m["role"] == "user" else chat_text(m["content"])}
            for m in conversation]


def _display_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    scale = min(1.0, DISPLAY_SIDE / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def overlay_value(result: Result | None) -> tuple | None:
    """``(image, [(mask, label), ...])`` for ``gr.AnnotatedImage`` at the display size, or None."""
    if result is None:
        return None
    size = _display_size(result.image.size)
    image = result.image if size == result.image.size else result.image.resize(size, Image.Resampling.BILINEAR)
    masks = [mask if mask.shape == (size[1], size[0]) else
             np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST), dtype=bool)
             for mask in result.masks]
    if masks:  # opaque outlines on the image (mmseg.masks.overlay with no fill), fills as annotations
        image = overlay(image, masks, alpha=0.0)
    # the annotation's value is its opacity
    annotations = [(m.astype(np.float32) * MASK_ALPHA, label) for m, label in zip(masks, mask_labels(result))]
    return image, annotations


def color_map(result: Result | None) -> dict[str, str]:
    if result is None:
        return {}
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(mask_labels(result))}


def timings_text(result: Result | None) -> str:
    if result is None:
        return ""
    t = result.timings
    stages = " · ".join(f"{label} {t[key]:.0f}" for key, label in STAGES if key in t)
    total = t.get("total_ms", sum(v for k, v in t.items() if k != "total_ms"))
    n = len(result.masks)
    return (f"**{total:.0f} ms** with head `{result.head}` ({stages} ms) · "
            f"{n} mask{'s' if n != 1 else ''} · image {result.original_size[0]}x{result.original_size[1]}")


def notes_text(notes: list[str] | None = None, error: str | None = None) -> str:
    lines = []
    if error:
        lines.append(f"⚠️ **{html.escape(error)}**")
    lines += [f"ℹ️ {html.escape(n)}" for n in (notes or [])]
    return "\n\n".join(lines)


class Downloads:
    """Mask PNGs and a COCO RLE JSON in a private temp folder; files older than ``keep_s`` are pruned."""

    def __init__(self, folder: str | Path | None = None, keep_s: float = 3600.0) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="mmseg-ui-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep_s = keep_s

    def write(self, result: Result | None) -> list[str]:
        if result is None or not result.masks:
            return []
        self._prune()
        out = self.folder / uuid.uuid4().hex[:12]
        out.mkdir()
        w, h = result.original_size
        paths = []
        for i, mask in enumerate(result.masks):
            path = out / f"mask_{i + 1}.png"
            if mask.shape == (h, w):
                save_mask_png(mask, path)
            elif w * h <= MAX_PNG_PIXELS:
                Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST).save(path)
            else:  # beyond what is sensible to rasterise; the RLE JSON is still at the original size
                path = out / f"mask_{i + 1}_{mask.shape[1]}x{mask.shape[0]}.png"
                save_mask_png(mask, path)
            paths.append(str(path))
        rle = out / "masks_coco_rle.json"
        rle.write_text(json.dumps(result.rles()))
        paths.append(str(rle))
        return paths

    def _prune(self) -> None:
        cutoff = time.time() - self.keep_s
        for sub in self.folder.iterdir():
            try:
                if sub.stat().st_mtime < cutoff:
                    for f in sub.iterdir():
                        f.unlink()
                    sub.rmdir()
            except OSError:
                pass
