import numpy as np
import pytest
import torch
from PIL import Image

from mmseg.imageio import ImageError
from mmseg.predictor import Answer, Segmenter, logits_to_original
from mmseg.processing import ImageTransform
from tiny import force_answer, tiny_model




@pytest.fixture(scope="module")
def segmenter():
    model, proc = tiny_model(seed=5)
    model.head.constrain = force_answer([proc.seg_token_id, proc.eos_token_id])
    return Segmenter(model, proc)


@pytest.mark.parametrize("size", [(64, 64), (90, 40), (33, 200)])
def test_masks_come_back_at_the_original_size(segmenter, size):
    image = Image.new("RGB", size, (10, 200, 30))
    answer = segmenter(image, "the green square")
    assert isinstance(answer, Answer) and answer.text == "<seg>"
    assert len(answer.masks) == 1 and answer.masks[0].shape == (size[1], size[0]) and answer.masks[0].dtype == bool
    assert len(answer.boxes) == 1
    assert {"vision_ms", "prefill_ms", "text_ms", "mask_ms", "total_ms"} <= set(answer.timings)


def test_inputs_of_every_kind(segmenter, tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGBA", (50, 30)).save(path)
    for image in (path, str(path), np.zeros((30, 50, 3), np.uint8), Image.new("P", (50, 30)), Image.new("CMYK", (50, 30))):
        assert segmenter(image, "the circle").masks[0].shape == (30, 50)


def test_bad_inputs_are_clear_errors(segmenter, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        segmenter(Image.new("RGB", (8, 8)), "   ")
    with pytest.raises(ImageError, match="not found"):
        segmenter(tmp_path / "missing.png", "the circle")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="cannot read"):
        segmenter(corrupt, "the circle")
    with pytest.raises(ValueError, match="last message"):
        segmenter.chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="role"):
        segmenter.chat([{"role": "system", "content": "a"}], Image.new("RGB", (8, 8)))
    # STAMP takes no per-call options: a HiMTok option is refused by name, not silently ignored
    assert segmenter.head_options == ()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['keep_tokens'\] for the stamp head; valid: none"):
        segmenter(Image.new("RGB", (8, 8)), "the circle", keep_tokens=8)


def test_long_message_is_truncated_with_a_note(segmenter):
    answer = segmenter(Image.new("RGB", (32, 32)), "red " * 5000)
    assert answer.notes and "truncated" in answer.notes[0]


def test_multi_turn_chat_and_batch_agree(segmenter):
    image = Image.new("RGB", (40, 40), (200, 0, 0))
    turns = [{"role": "user", "content": "how many circles?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "segment the red one"}]
    single = segmenter.chat(turns, image)
    batched = segmenter.batch([turns, [{"role": "user", "content": "hi"}]], [image, image])
    assert np.array_equal(single.masks[0], batched[0].masks[0])


def test_logits_map_back_through_the_letterbox():
    """A mask drawn on the original image survives the trip into the model square and back."""
    transform = ImageTransform(64, (0.5,) * 3, (0.5,) * 3)
    original = np.zeros((60, 150), bool)
    original[10:50, 100:140] = True
    _, box = transform(Image.new("RGB", (150, 60)))
    square = transform.mask_to_input(original, box) * 20 - 10  # as logits
    back = (logits_to_original(square, box, 64) > 0).numpy()
    inter, union = (back & original).sum(), (back | original).sum()
    assert back.shape == original.shape and inter / union > 0.9


def test_save_and_from_pretrained_round_trip(segmenter, tmp_path):
    segmenter.save_pretrained(tmp_path)
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    loaded.model.head.constrain = segmenter.model.head.constrain
    image = Image.new("RGB", (48, 40), (0, 0, 255))
    a, b = segmenter(image, "the blue one"), loaded(image, "the blue one")
    assert a.text == b.text and np.array_equal(a.masks[0], b.masks[0])
