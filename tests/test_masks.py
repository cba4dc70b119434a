"""Mask utilities: RLE coding, boxes, resizing, overlay, PNG export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmseg.masks import decode_rle, encode_rle, mask_to_box, overlay, resize_logits, resize_mask, save_mask_png


def test_rle_round_trip_random_masks() -> None:
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 13), (64, 48), (100, 3)]:
        for density in (0.0, 0.1, 0.5, 1.0):
            m = rng.random((h, w)) < density
            rle = encode_rle(m)
            assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
            assert np.array_equal(decode_rle(rle), m)
            assert np.array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), m)


def test_rle_uncompressed_counts() -> None:
    # 3x2 image, column-major pixels: 0 1 1 | 0 0 1  -> runs 1 zero, 2 ones, 2 zeros, 1 one
    m = decode_rle({"size": [3, 2], "counts": [1, 2, 2, 1]})
    assert m.tolist() == [[False, False], [True, False], [True, True]]
    assert encode_rle(m)["counts"] == encode_rle(m)["counts"]  # str, stable
    with pytest.raises(ValueError):
        decode_rle({"counts": "abc"})


def test_mask_to_box() -> None:
    m = np.zeros((10, 20), dtype=bool)
    assert mask_to_box(m) is None
    m[3:6, 4:9] = True
    assert mask_to_box(m) == (4.0, 3.0, 9.0, 6.0)  # exclusive x2/y2
    m[:] = False
    m[0, 19] = True
    assert mask_to_box(m) == (19.0, 0.0, 20.0, 1.0)


def test_resize_logits_and_masks() -> None:
    assert resize_logits(torch.zeros(8, 6), (32, 24)).shape == (32, 24)
    out = resize_logits(torch.randn(3, 8, 6), (5, 7))
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32
    const = resize_logits(torch.full((4, 4), 2.5), (9, 9))
    assert torch.allclose(const, torch.full((9, 9), 2.5))
    with pytest.raises(ValueError):
        resize_logits(torch.zeros(1, 1, 4, 4), (8, 8))
    m = np.zeros((4, 4), dtype=bool)
    m[1:3, 1:3] = True
    up = resize_mask(m, (8, 8))
    assert up.dtype == bool and up.shape == (8, 8) and up[2:6, 2:6].all() and up.sum() == 16
    assert np.array_equal(resize_mask(up, (4, 4)), m)  # nearest up then down gives the original back
    t = resize_mask(torch.from_numpy(m), (8, 8))
    assert t.dtype == torch.bool and np.array_equal(t.numpy(), up)


def test_overlay_and_png(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    a = np.zeros((10, 20), dtype=bool)
    a[2:8, 2:10] = True
    out = overlay(img, [a, np.zeros_like(a)], labels=["a", "b"], alpha=0.5)
    arr = np.asarray(out)
    assert out.mode == "RGB" and out.size == img.size
    assert arr[5, 5].any() and not arr[5, 15].any()  # inside tinted, outside untouched
    with pytest.raises(ValueError):
        overlay(img, [np.zeros((5, 5), dtype=bool)])
    p = save_mask_png(a, tmp_path / "sub" / "m.png")
    with Image.open(p) as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
        assert np.array_equal(np.asarray(im) > 0, a)
