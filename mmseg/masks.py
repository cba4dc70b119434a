"""Binary-mask utilities: COCO RLE coding, boxes, resizing, overlays, PNG export.

Conventions used throughout this module:

* a *mask* is a numpy ``bool`` array of shape ``(H, W)`` (row = y, column = x);
* a *box* is a tuple ``(x1, y1, x2, y2)`` in XYXY pixels where ``x2``/``y2`` are
  exclusive pixel edges, so the box of a single pixel at (x, y) is (x, y, x+1, y+1);
* an *RLE* is a COCO run-length encoding dict ``{"size": [H, W], "counts": str}``
  (column-major / Fortran order, as pycocotools produces it). ``counts`` is kept as
  ``str`` so that the dict is JSON-serialisable as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

if TYPE_CHECKING:  # torch is heavy; only the two resize helpers need it at run time
    import torch

__all__ = [
    "encode_rle",
    "decode_rle",
    "decode_segmentation",
    "mask_to_box",
    "resize_logits",
    "resize_mask",
    "overlay",
    "save_mask_png",
]

Box = tuple[float, float, float, float]

# Distinct, saturated colours for overlays (RGB); cycled when there are more masks.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56),
    (56, 200, 255),
    (72, 220, 72),
    (255, 200, 0),
    (200, 80, 255),
    (255, 128, 0),
    (0, 255, 200),
    (255, 100, 180),
)


def _as_bool_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a 2-D numpy bool array (accepts numpy arrays and torch tensors)."""
    if hasattr(mask, "detach"):  # torch tensor, without importing torch
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W); got shape {arr.shape}")
    return arr if arr.dtype == np.bool_ else arr > 0


def mask_digest(mask: Any) -> bytes:
    """A content key of a mask ``(H, W)`` (bool, or float/uint8 binarised at 0.5; array or tensor): equal keys mean
    equal binary masks of equal shape. For memoising work done per mask."""
    import hashlib

    m = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    binary = m if m.dtype == bool else m > 0.5
    return hashlib.blake2b(np.packbits(binary).tobytes(), digest_size=16).digest() + repr(binary.shape).encode()


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a bool (H, W) mask as COCO RLE ``{"size": [H, W], "counts": str}``.

    pycocotools expects a Fortran-ordered uint8 array; ``counts`` comes back as
    bytes and is decoded to ``str`` so the result can go straight into JSON.
    """
    m = _as_bool_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode one COCO RLE dict to a bool (H, W) mask.

    Accepts compressed RLE with ``counts`` as ``str`` or ``bytes`` and uncompressed
    RLE with ``counts`` as a list of run lengths (as found in COCO crowd annotations).
    """
    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"RLE must have 'size' and 'counts' keys; got keys {sorted(rle)}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        # frPyObjects converts the uncompressed run list into pycocotools' compressed form.
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, str):
        compressed = {"size": [h, w], "counts": counts.encode("ascii")}
    elif isinstance(counts, (bytes, bytearray)):
        compressed = {"size": [h, w], "counts": bytes(counts)}
    else:
        raise ValueError(f"RLE counts must be str, bytes or list; got {type(counts).__name__}")
    return mask_utils.decode(compressed).astype(bool)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` field to a bool (height, width) mask.

    Handles the three COCO forms: a list of polygons (each a flat ``[x1, y1, x2, y2, ...]``
    list in pixels), an uncompressed RLE (``counts`` list) and a compressed RLE
    (``counts`` str/bytes). Multiple parts are merged by union, so overlapping
    polygons still give a plain 0/1 mask.
    """
    if isinstance(segmentation, list):
        polys = [list(map(float, p)) for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(polys, height, width)
        # decode gives (H, W, n_parts); any() over parts is the union.
        return mask_utils.decode(rles).any(axis=2)
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation)
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {mask.shape} does not match image size {(height, width)}")
        return mask
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


def mask_to_box(mask: np.ndarray) -> Box | None:
    """Tight XYXY box (float pixels, exclusive x2/y2) covering the True pixels; ``None`` if empty."""
    m = _as_bool_mask(mask)
    cols = np.flatnonzero(m.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(m.any(axis=1))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def resize_logits(logits: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """Bilinearly resize mask logits (h, w) or (B, h, w) to ``size`` = (H, W).

    Uses ``align_corners=False`` (pixel-area convention, same as the image resize).
    Returns a tensor with the input's leading shape and dtype float32 or the input float dtype.
    """
    import torch
    import torch.nn.functional as F

    if logits.ndim not in (2, 3):
        raise ValueError(f"logits must be (h, w) or (B, h, w); got shape {tuple(logits.shape)}")
    x = logits if logits.is_floating_point() else logits.float()
    squeeze = x.ndim == 2
    x = x[None, None] if squeeze else x[:, None]
    out = F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    out = out[0, 0] if squeeze else out[:, 0]
    assert isinstance(out, torch.Tensor)
    return out


def resize_mask(mask: Any, size: tuple[int, int]) -> Any:
    """Nearest-neighbour resize of a bool (h, w) mask to ``size`` = (H, W).

    Samples at pixel centres (the "nearest-exact" rule), so up- and down-scaling by
    integer factors is symmetric. Returns numpy bool (H, W) for numpy input and a
    torch bool tensor for torch input.
    """
    out_h, out_w = int(size[0]), int(size[1])
    if hasattr(mask, "detach"):
        import torch.nn.functional as F

        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (h, w); got shape {tuple(mask.shape)}")
        x = mask[None, None].float()
        return F.interpolate(x, size=(out_h, out_w), mode="nearest-exact")[0, 0] > 0.5
    m = _as_bool_mask(mask)
    h, w = m.shape
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return m[rows[:, None], cols[None, :]]


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` px of its edge (4-neighbour erosion, numpy only)."""
    inner = mask.copy()
    for _ in range(max(1, width)):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        # pixels on the image border count as edge pixels
        shrunk[0, :] = shrunk[-1, :] = False
        shrunk[:, 0] = shrunk[:, -1] = False
        inner = shrunk
    return mask & ~inner


def overlay(
    image: Image.Image,
    masks: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Draw coloured, outlined masks (each bool (H, W) at the image size) over ``image``.

    Each mask gets a palette colour blended with weight ``alpha`` plus an opaque
    outline; optional ``labels`` are written at the top-left of each mask's box.
    Returns a new RGB image of the same size.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    h, w = base.shape[:2]
    if labels is not None and len(labels) != len(masks):
        raise ValueError(f"got {len(labels)} labels for {len(masks)} masks")
    line = max(1, round(min(h, w) / 200))
    outlines = []
    for i, mask in enumerate(masks):
        m = _as_bool_mask(mask, f"masks[{i}]")
        if m.shape != (h, w):
            raise ValueError(f"masks[{i}] has shape {m.shape}, image is {(h, w)}")
        color = np.array(_PALETTE[i % len(_PALETTE)], dtype=np.float32)
        base[m] = (1.0 - alpha) * base[m] + alpha * color
        outlines.append((_boundary(m, line), color))
    # outlines go on after all fills so a later fill does not wash out an earlier edge
    for edge, color in outlines:
        base[edge] = color
    out = Image.fromarray(np.clip(base + 0.5, 0, 255).astype(np.uint8))
    if labels:
        draw = ImageDraw.Draw(out)
        for i, (mask, text) in enumerate(zip(masks, labels)):
            box = mask_to_box(mask)
            if box is None or not text:
                continue
            x, y = box[0], max(0.0, box[1] - 11)
            tb = draw.textbbox((x, y), text)
            draw.rectangle(tb, fill=_PALETTE[i % len(_PALETTE)])
            draw.text((x, y), text, fill=(0, 0, 0))
    return out


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Write a bool (H, W) mask as an 8-bit grayscale ('L') PNG with values 0/255."""
    m = _as_bool_mask(mask)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m.astype(np.uint8) * 255).save(p, format="PNG")
    return p
