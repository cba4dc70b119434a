"""Turning whatever a user hands us into an RGB PIL image, with errors a person can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, Path, Image.Image, np.ndarray]

# Decompression-bomb guard: far above any real photo, far below what would exhaust memory.
MAX_PIXELS = 120_000_000


class ImageError(ValueError):
    """The input is not a usable image (missing file, not an image, corrupt, wrong array shape)."""


def load_image(image: ImageLike) -> Image.Image:
    """Return ``image`` as an RGB ``PIL.Image``.

    Accepts a path, a PIL image of any mode (RGBA and LA are composited on white, P/L/CMYK/I;16/F converted,
    EXIF orientation applied) or an array ``(H, W)``, ``(H, W, 1|3|4)`` of uint8, or float in [0, 1].
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise ImageError(f"image file not found: {path}")
        if path.is_dir():
            raise ImageError(f"expected an image file, got a folder: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                pil = opened.copy() if opened.mode != "P" else opened.convert("RGBA")
                pil.info.update(opened.info)
                exif = opened.getexif()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"cannot read image {path}: {err}") from None
        if exif:
            pil = ImageOps.exif_transpose(_with_exif(pil, exif))
    elif isinstance(image, Image.Image):
        try:
            image.load()
        except (OSError, ValueError) as err:
            raise ImageError(f"corrupt image: {err}") from None
        pil = ImageOps.exif_transpose(image) if image.getexif() else image
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; pass a path, a PIL image or an array")
    if pil.width * pil.height > MAX_PIXELS:
        raise ImageError(f"image of {pil.width}x{pil.height} pixels is larger than the {MAX_PIXELS:,} pixel limit")
    if pil.width < 1 or pil.height < 1:
        raise ImageError("image is empty (zero width or height)")
    return _to_rgb(pil)


def _with_exif(pil: Image.Image, exif: Image.Exif) -> Image.Image:
    pil.info["exif"] = exif.tobytes()
    return pil


def _to_rgb(pil: Image.Image) -> Image.Image:
    if pil.mode == "RGB":
        return pil
    if pil.mode == "P":
        pil = pil.convert("RGBA")
    if pil.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", pil.size, (255, 255, 255))
        background.paste(pil.convert("RGBA"), mask=pil.convert("RGBA").getchannel("A"))
        return background
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth greyscale: rescale the actual range to 8 bits instead of clipping at 255.
        arr = np.asarray(pil, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    return pil.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {arr.shape}")
    if arr.size == 0:
        raise ImageError("image array is empty")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("image array contains NaN or infinity")
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 (H,W) -> L, (H,W,3) -> RGB, (H,W,4) -> RGBA
