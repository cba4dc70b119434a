import numpy as np
import pytest
from PIL import Image

from mmseg.imageio import ImageError, load_image


def test_modes_become_rgb_at_same_size():
    base = Image.new("RGB", (40, 30), (200, 10, 10))
    for mode in ("RGBA", "L", "P", "CMYK", "I;16", "LA", "1", "F", "I"):
        image = load_image(base.convert(mode) if mode not in ("I;16", "F", "I") else Image.new(mode, (40, 30)))
        assert image.mode == "RGB" and image.size == (40, 30), mode


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_range_is_rescaled_not_clipped():
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    image = load_image(Image.fromarray(arr))
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 0)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_arrays():
    assert load_image(np.zeros((10, 12), np.uint8)).size == (12, 10)
    assert load_image(np.zeros((10, 12, 4), np.uint8)).size == (12, 10)
    assert load_image(np.ones((10, 12, 3), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((10, 12, 5), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((4, 4), np.nan))


def test_missing_corrupt_and_folder(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(text)
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(42)
