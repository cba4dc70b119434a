"""Procedurally generated binary masks, so the mask tokenizer learns shapes beyond SynthRef's objects:
random polygons (convex and star-like), smooth blobs, thin strokes, shapes with holes, and multi-part masks."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _polygon(rng: np.random.Generator, size: int, draw: ImageDraw.ImageDraw, fill: int) -> None:
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    n = int(rng.integers(3, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    base = rng.uniform(0.08, 0.4) * size
    radii = base * rng.uniform(0.35 if rng.random() < 0.5 else 0.85, 1.0, n)  # star-like or near convex
    pts = [(cx + r * np.cos(a), cy + r * np.sin(a) * rng.uniform(0.6, 1.4)) for r, a in zip(radii, angles)]
    draw.polygon(pts, fill=fill)


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    field = np.zeros((size, size))
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        s = rng.uniform(0.04, 0.15)
        field += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    return field > rng.uniform(0.4, 0.8)


def _stroke(rng: np.random.Generator, size: int, draw: ImageDraw.ImageDraw, fill: int) -> None:
    pts = [tuple(rng.uniform(0.1, 0.9, 2) * size) for _ in range(int(rng.integers(2, 6)))]
    draw.line(pts, fill=fill, width=max(1, int(rng.uniform(0.015, 0.06) * size)), joint="curve")


def random_mask(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One bool ``(size, size)`` mask of a random family (never empty)."""
    while True:
        image = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(image)
        family = rng.choice(["polygon", "blob", "stroke", "holes", "parts"])
        if family == "polygon":
            _polygon(rng, size, draw, 255)
        elif family == "stroke":
            _stroke(rng, size, draw, 255)
        elif family == "holes":
            _polygon(rng, size, draw, 255) if rng.random() < 0.5 else draw.ellipse(
                tuple(sorted(rng.uniform(0.1, 0.45, 2) * size)) + tuple(sorted(rng.uniform(0.55, 0.9, 2) * size)), fill=255)
            for _ in range(int(rng.integers(1, 3))):
                cx, cy = rng.uniform(0.3, 0.7, 2) * size
                r = rng.uniform(0.03, 0.12) * size
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
        elif family == "parts":
            for _ in range(int(rng.integers(2, 4))):
                (_polygon if rng.random() < 0.7 else _stroke)(rng, size, draw, 255)
        mask = np.asarray(image) > 127 if family != "blob" else _blob(rng, size)
        if mask.sum() >= max(4, size * size // 2000):
            return mask
