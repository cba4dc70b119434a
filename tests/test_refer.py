"""REFER-format reader: SynthRef round trip, real-refCOCO-style folders, safety, error messages."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmseg.data.refer import ReferDataset, load_image, load_refs, read_qa
from mmseg.masks import decode_rle, encode_rle

IMG_W, IMG_H = 14, 12
FILE = "COCO_train2014_000000000001.jpg"


def _column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts, computed by hand (runs over the Fortran-ordered pixels, zeros first)."""
    flat = mask.T.reshape(-1).astype(int)
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return runs


def _rect(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((IMG_H, IMG_W), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


@pytest.fixture()
def fake_refcoco(tmp_path: Path) -> Path:
    """A hand-written refcoco folder: one image, polygon / uncompressed-RLE / compressed-RLE anns, a no-target ref."""
    data = tmp_path / "data"
    (data / "refcoco").mkdir(parents=True)
    img_dir = data / "images" / "mscoco" / "images" / "train2014"  # REFER toolkit layout
    img_dir.mkdir(parents=True)
    Image.new("RGB", (IMG_W, IMG_H), (10, 20, 30)).save(img_dir / FILE)
    crowd = _rect(1, 1, 4, 6)
    anns = [
        # two overlapping rectangles: x 2..9 / y 2..7 and x 6..11 / y 4..9
        {"id": 101, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0,
         "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8], [6, 4, 12, 4, 12, 10, 6, 10]]},
        {"id": 102, "image_id": 1, "category_id": 2, "bbox": [1, 1, 3, 5], "iscrowd": 1,
         "segmentation": {"size": [IMG_H, IMG_W], "counts": _column_major_runs(crowd)}},
        {"id": 103, "image_id": 1, "category_id": 2, "bbox": [9, 0, 3, 2], "iscrowd": 0,
         "segmentation": encode_rle(_rect(9, 0, 12, 2))},
    ]
    inst = {
        "images": [{"id": 1, "file_name": FILE, "width": IMG_W, "height": IMG_H}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }
    (data / "refcoco" / "instances.json").write_text(json.dumps(inst))

    def ref(ref_id: int, ann_id: int, split: str, sents: list[str], cat: int = 1) -> dict:
        sentences = [{"sent_id": ref_id * 10 + i, "sent": s, "raw": s.upper(), "tokens": s.split()} for i, s in enumerate(sents)]
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 1, "split": split, "category_id": cat,
                "file_name": "COCO_train2014_000000000001_%d.jpg" % ann_id, "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences}

    refs = [
        ref(0, 101, "train", ["man in red", "left guy"]),
        ref(1, 102, "train", ["crowd"], 2),
        ref(2, 103, "train", ["small dog"], 2),
        ref(3, -1, "train", ["the cat"], 2),
        ref(4, 101, "testA", ["person"]),
    ]
    with open(data / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return data


def test_synthref_round_trip(synthref_root: Path) -> None:
    inst = json.loads((synthref_root / "synthref" / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    for split in ("train", "val", "testA", "testB"):
        ds = ReferDataset(synthref_root, "synthref", "unc", split)
        assert ds.image_root == synthref_root / "images"
        expected = [(r["ref_id"], s["sent_id"], s["sent"]) for r in ds.refs for s in r["sentences"]]
        assert len(ds) == len(expected) > 0
        got = [(ds[i].ref_id, ds[i].sent_id, ds[i].sentence) for i in range(len(ds))]
        assert got == expected  # one sample per sentence, file order
        for i in range(0, len(ds), 7):
            s = ds[i]
            img = load_image(s)
            assert img.mode == "RGB" and s.mask.shape == (img.height, img.width) and s.mask.dtype == bool
            ref = ds.refs[[r["ref_id"] for r in ds.refs].index(s.ref_id)]
            assert s.expr_type == ref["expr_type"] and s.has_target == (ref["ann_id"] != -1)
            if s.has_target:
                a = anns[ref["ann_id"]]
                assert np.array_equal(s.mask, decode_rle(a["segmentation"]))
                x, y, w, h = a["bbox"]
                assert s.box == (x, y, x + w, y + h)
                assert s.category == inst["categories"][a["category_id"] - 1]["name"]
            else:
                assert not s.mask.any() and s.box == (0.0, 0.0, 0.0, 0.0) and s.category is not None
    assert ds[-1].sent_id == ds[len(ds) - 1].sent_id
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert {q["split"] for q in read_qa(synthref_root, "val")} == {"val"}


def test_refcoco_style_annotations_decode(fake_refcoco: Path) -> None:
    ds = ReferDataset(fake_refcoco, "refcoco", "unc", "train")  # image folder found automatically
    assert ds.image_root == fake_refcoco / "images" / "mscoco" / "images" / "train2014"
    assert [s.sentence for s in (ds[i] for i in range(len(ds)))] == ["man in red", "left guy", "crowd", "small dog", "the cat"]
    poly = ds[0]
    union = _rect(2, 2, 10, 8) | _rect(6, 4, 12, 10)
    assert poly.mask.dtype == bool and poly.mask.shape == (IMG_H, IMG_W)
    assert np.array_equal(poly.mask, union)  # overlap counted once, plain 0/1
    assert poly.box == (2.0, 2.0, 12.0, 10.0) and poly.category == "person" and poly.has_target
    assert np.array_equal(ds[2].mask, _rect(1, 1, 4, 6))  # uncompressed RLE
    assert np.array_equal(ds[3].mask, _rect(9, 0, 12, 2))  # compressed RLE, counts str
    nt = ds[4]
    assert not nt.has_target and not nt.mask.any() and nt.mask.shape == (IMG_H, IMG_W)
    assert nt.box == (0.0, 0.0, 0.0, 0.0) and nt.category == "dog" and nt.expr_type is None
    assert load_image(nt).size == (IMG_W, IMG_H)
    explicit = ReferDataset(fake_refcoco, "refcoco", "unc", "testA", image_root=ds.image_root)
    assert len(explicit) == 1


def test_malicious_pickle_refused(fake_refcoco: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = [{"ref_id": 0, "ann_id": 101, "image_id": 1, "split": "train", "sentences": [{"sent": "x"}], "x": Evil()}]
    with open(fake_refcoco / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"contains object of type .*system; only plain containers"):
        ReferDataset(fake_refcoco, "refcoco", "unc", "train")
    with pytest.raises(ValueError):
        load_refs(fake_refcoco / "refcoco" / "refs(unc).p")
    assert not marker.exists()


def test_missing_data_shows_layout(tmp_path: Path, fake_refcoco: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        ReferDataset(tmp_path / "nope", "refcoco", "unc", "train")
    msg = str(e.value)
    assert "expected layout:" in msg and "refcoco/instances.json" in msg and "refcoco/refs(unc).p" in msg
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p not found \(found: refs\(unc\)\.p\)"):
        ReferDataset(fake_refcoco, "refcoco", "umd", "train")
    (fake_refcoco / "refcoco" / "instances.json").rename(fake_refcoco / "refcoco" / "other.json")
    with pytest.raises(FileNotFoundError, match="expected layout"):
        ReferDataset(fake_refcoco, "refcoco", "unc", "train")


def test_missing_images_lists_candidates(fake_refcoco: Path) -> None:
    (fake_refcoco / "images" / "mscoco" / "images" / "train2014" / FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"tried:(.|\n)*images/mscoco/images/train2014(.|\n)*coco/train2014"):
        ReferDataset(fake_refcoco, "refcoco", "unc", "train")


def test_unknown_and_empty_split(fake_refcoco: Path) -> None:
    with pytest.raises(ValueError, match="valid splits: testA, testB, train, val"):
        ReferDataset(fake_refcoco, "refcoco", "unc", "test")
    with pytest.raises(ValueError, match="no sentences for split 'val'"):
        ReferDataset(fake_refcoco, "refcoco", "unc", "val")


@pytest.mark.parametrize(
    "payload, match",
    [
        ({"not": "a list"}, "must hold a list of refs"),
        ([{"ref_id": 0, "image_id": 1}], "lacks keys"),
        ([{"ref_id": 0, "ann_id": 1, "image_id": 1, "split": "train", "sentences": "oops"}], "'sentences' must be"),
    ],
)
def test_malformed_refs(fake_refcoco: Path, payload: object, match: str) -> None:
    with open(fake_refcoco / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(payload, f, protocol=4)
    with pytest.raises(ValueError, match=match) as e:
        ReferDataset(fake_refcoco, "refcoco", "unc", "train")
    assert "expected layout:" in str(e.value)
