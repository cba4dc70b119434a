"""UI logic without a server: input checks, head choice, masks at the original size, rendering, downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmseg.masks import decode_rle, encode_rle, resize_mask
from test_ui_support import forced_segmenter
from ui.core import (
    MAX_CHARS,
    WORK_SIDE,
    Heads,
    UserError,
    answer,
    clean_history,
    clean_message,
    keep_tokens_option,
    prepare_image,
    rle_at_size,
)
from ui.render import Downloads, chat_messages, chat_text, mask_labels, overlay_value, timings_text


@pytest.fixture(scope="module")
def seg():
    return forced_segmenter()


@pytest.mark.parametrize("small,size", [((5, 7), (13, 11)), ((64, 64), (128, 300)), ((40, 30), (20, 50)),
                                        ((10, 10), (7, 7)), ((3, 3), (3, 9))])
def test_rle_at_size_equals_resize_then_encode(small, size):
    rng = np.random.default_rng(0)
    blob = np.zeros(small, bool)
    blob[small[0] // 4: 3 * small[0] // 4, small[1] // 3:] = True
    for mask in (rng.random(small) > 0.5, np.zeros(small, bool), np.ones(small, bool), blob):
        assert rle_at_size(mask, size) == encode_rle(resize_mask(mask, size))


def test_rle_at_a_huge_size_never_builds_the_mask():
    mask = np.zeros((2048, 2048), bool)
    mask[100:900, 300:1500] = True
    rle = rle_at_size(mask, (10000, 10000))
    assert rle["size"] == [10000, 10000]
    full = decode_rle(rle)
    assert abs(full.mean() - mask.mean()) < 1e-3


def test_messages_are_checked_and_cut():
    with pytest.raises(UserError, match="empty"):
        clean_message("   \n ")
    with pytest.raises(UserError, match="empty"):
        clean_message(None)
    text, notes = clean_message("x" * 20_000)
    assert len(text) == MAX_CHARS and "20,000" in notes[0]
    assert clean_message("  the red circle ") == ("the red circle", [])


def test_history_is_checked():
    assert clean_history(None) == [] and clean_history("[]") == []
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<seg>"}]
    assert clean_history(ok) == ok and clean_history(json.dumps(ok)) == ok
    for bad in ("{", [{"role": "system", "content": "a"}], [{"role": "user", "content": "a"}], {"a": 1}):
        with pytest.raises(UserError):
            clean_history(bad)


def test_images_are_checked_and_large_ones_downscaled(tmp_path):
    with pytest.raises(UserError, match="No image"):
        prepare_image(None)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="not an image"):
        prepare_image(str(bad))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not an image"):
        prepare_image(str(text))
    with pytest.raises(UserError, match="missing"):
        prepare_image(str(tmp_path / "gone.png"))
    big = Image.new("L", (WORK_SIDE * 2 + 10, 300), 90)
    prepared = prepare_image(big)
    assert prepared.original_size == big.size and max(prepared.image.size) == WORK_SIDE and prepared.image.mode == "RGB"
    assert "downscaled" in prepared.notes[0]
    small = prepare_image(np.zeros((20, 30, 3), np.uint8))
    assert small.image.size == (30, 20) and not small.notes


def test_heads_by_name(seg):
    heads = Heads([seg, seg])
    assert heads.names == ["stamp", "stamp #2"] and heads.default == "stamp"
    assert heads.get("")[0] == "stamp" and heads.get(None)[0] == "stamp" and heads.get("stamp #2")[1] is seg
    with pytest.raises(UserError, match="Unknown head 'himtok'.*stamp"):
        heads.get("himtok")
    assert not heads.takes_tokens("stamp") and keep_tokens_option(heads, "stamp", 8) == {}
    assert heads.default_probability() == pytest.approx(0.5)


def test_answer_rethreshold_and_original_size_masks(seg, tmp_path):
    heads = Heads({"stamp": seg})
    prepared = prepare_image(Image.new("RGB", (WORK_SIDE + 400, 100), (200, 30, 30)))
    result = answer(heads, "", prepared, [], "the red one", notes=["n1"])
    assert result.text == "<seg>" and len(result.masks) == 1 and result.masks[0].shape == (84, WORK_SIDE)
    assert result.notes[0] == "n1" and any("downscaled" in n for n in result.notes)
    rles = result.rles()
    assert rles[0]["size"] == [100, WORK_SIDE + 400]
    result.rethreshold(0.999)
    low = result.masks[0].sum()
    result.rethreshold(0.001)
    assert result.masks[0].sum() >= low and result.masks[0].all()
    details = result.details()
    assert details["image_size"] == [100, WORK_SIDE + 400] and details["history"][-1]["content"] == "<seg>"
    files = Downloads(tmp_path).write(result)
    assert [f.rsplit("/", 1)[1] for f in files] == ["mask_1.png", "masks_coco_rle.json"]
    png = Image.open(files[0])
    assert png.size == (WORK_SIDE + 400, 100) and np.asarray(png).max() == 255
    assert json.loads(open(files[1]).read())[0]["size"] == [100, WORK_SIDE + 400]


def test_rendering(seg):
    heads = Heads(seg)
    result = answer(heads, None, prepare_image(Image.new("RGB", (50, 40))), [], "the <b>circle</b>")
    assert chat_text("Sure, <seg> and <seg>.") == "Sure, **[mask 1]** and **[mask 2]**."
    assert chat_messages(result.conversation)[0]["content"] == "the &lt;b&gt;circle&lt;/b&gt;"
    assert mask_labels(result) == ["1: the <b>circle</b>"]
    result.messages[-1]["content"] = "Please segment the red circle."
    assert mask_labels(result) == ["1: the red circle"]
    image, annotations = overlay_value(result)
    assert image.size == (50, 40) and annotations[0][0].shape == (40, 50)
    assert "ms" in timings_text(result) and "stamp" in timings_text(result)


class _CoarseToFine:
    """A stand-in for a HiMTok-style Segmenter: records the options it gets, answers one mask."""

    head_name, head_options, threshold = "himtok", ("keep_tokens",), 0.0

    def __init__(self):
        self.calls = []

    def chat(self, messages, image, **options):
        from mmseg.predictor import Answer

        self.calls.append(options)
        logits = np.full((image.height, image.width), -1.0, np.float32)
        logits[: 1 + options.get("keep_tokens", 32) % image.height] = 1.0
        return Answer(text="Sure, <seg>.", masks=[logits > 0], logits=[logits], timings={"total_ms": 1.0})


def test_tokens_only_for_coarse_to_fine_heads(seg):
    stub = _CoarseToFine()
    heads = Heads({"stamp": seg, "himtok": stub})
    assert heads.takes_tokens("himtok") and not heads.takes_tokens("stamp") and not heads.takes_tokens("nope")
    assert keep_tokens_option(heads, "himtok", 8) == {"keep_tokens": 8}
    assert keep_tokens_option(heads, "himtok", 32) == {} and keep_tokens_option(heads, "himtok", None) == {}
    with pytest.raises(UserError, match="whole number"):
        keep_tokens_option(heads, "himtok", "many")
    prepared = prepare_image(Image.new("RGB", (20, 40)))
    result = answer(heads, "himtok", prepared, [], "the cat", keep_tokens_option(heads, "himtok", 4))
    assert stub.calls == [{"keep_tokens": 4}] and result.masks[0].sum() == 5 * 20 and result.options == {"keep_tokens": 4}
