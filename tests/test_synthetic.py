"""SynthRef generator: layout, determinism, expression validity, split mixes, QA."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from mmseg.data.synthetic import (
    EXPR_TYPES,
    KINDS,
    MIN_VISIBLE_PX,
    SceneObject,
    expr_type,
    mask_centroid,
    parse_expression,
    resolve,
    write_synthref,
)
from mmseg.masks import decode_rle


def _load(root: Path) -> tuple[dict, list[dict], list[dict]]:
    inst = json.loads((root / "synthref" / "instances.json").read_text())
    with open(root / "synthref" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    qa = json.loads((root / "synthref" / "qa.json").read_text())
    return inst, refs, qa


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(synthref_root: Path) -> None:
    inst, refs, qa = _load(synthref_root)
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    assert len(inst["images"]) == 60 + 45 + 30 + 30
    assert [c["name"] for c in inst["categories"]] == list(KINDS)
    assert all(c["supercategory"] == "shape" for c in inst["categories"])
    for im in inst["images"]:
        assert (synthref_root / "images" / im["file_name"]).is_file()
        assert im["width"] == im["height"] == 128
    from PIL import Image

    with Image.open(synthref_root / "images" / inst["images"][0]["file_name"]) as im:
        assert im.mode == "RGB" and im.size == (128, 128)
    ann = inst["annotations"][0]
    assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
    assert set(ann) >= {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
    r = refs[0]
    assert set(r) >= {"ref_id", "ann_id", "image_id", "split", "category_id", "file_name", "sent_ids", "sentences", "expr_type"}
    for r in refs:
        assert 1 <= len(r["sentences"]) <= 3
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        for s in r["sentences"]:
            assert s["sent"] == s["raw"].lower() and s["tokens"] == s["sent"].split()
    # images of different splits are disjoint
    split_of = defaultdict(set)
    for r in refs:
        split_of[r["image_id"]].add(r["split"])
    assert all(len(v) == 1 for v in split_of.values())


def test_same_seed_identical_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(n_train=4, n_val=3, n_test=2, progress=False)
    write_synthref(tmp_path / "a", seed=7, **kw)
    write_synthref(tmp_path / "b", seed=7, **kw)
    write_synthref(tmp_path / "c", seed=8, **kw)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da == db
    assert da.keys() == dc.keys()
    assert all(da[k] != dc[k] for k in ("synthref/instances.json", "synthref/refs(unc).p", "synthref/qa.json"))


def test_image_size_minimum(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="128"):
        write_synthref(tmp_path, n_train=1, n_val=0, n_test=0, image_size=64, progress=False)
    counts = write_synthref(tmp_path, n_train=1, n_val=1, n_test=1, image_size=160, progress=False)
    assert counts["images"] == 4


def test_every_sentence_denotes_exactly_its_object(synthref_root: Path) -> None:
    """Re-derive each expression's referent from the annotations alone (parsed sentence + masks)."""
    inst, refs, _ = _load(synthref_root)
    size = {im["id"]: im["width"] for im in inst["images"]}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in inst["annotations"]:
        by_image[a["image_id"]].append(a)
    scenes = {}
    for image_id, anns in by_image.items():
        objs = []
        for a in anns:
            cx, cy = mask_centroid(decode_rle(a["segmentation"]))
            objs.append(SceneObject(KINDS[a["category_id"] - 1], a["attributes"]["color"], a["attributes"]["size"], cx, cy))
        scenes[image_id] = ([a["id"] for a in anns], objs)
    n_checked = 0
    for r in refs:
        ann_ids, objs = scenes[r["image_id"]]
        for s in r["sentences"]:
            expr = parse_expression(s["sent"])
            result = resolve(expr, objs, size[r["image_id"]])
            assert result is not None, s["sent"]
            if r["ann_id"] == -1:
                assert result == (), s["sent"]
                assert r["expr_type"] == "no_target"
                assert expr.desc.kind is not None and KINDS[r["category_id"] - 1] == expr.desc.kind
            else:
                assert [ann_ids[i] for i in result] == [r["ann_id"]], s["sent"]
                assert expr_type(expr, result) == r["expr_type"], s["sent"]
            n_checked += 1
    assert n_checked > 500


def test_split_type_mix(synthref_root: Path) -> None:
    _, refs, _ = _load(synthref_root)
    types = {s: Counter(r["expr_type"] for r in refs if r["split"] == s) for s in ("train", "val", "testA", "testB")}
    assert set().union(*types.values()) <= set(EXPR_TYPES)
    assert set(types["testA"]) == {"attribute", "no_target"}
    assert set(types["testB"]) == {"relational", "no_target"}
    assert set(types["train"]) == set(EXPR_TYPES)
    val = types["val"]
    assert (val["positional"] + val["relational"]) / sum(val.values()) >= 1 / 3
    share = sum(t["no_target"] for t in types.values()) / sum(sum(t.values()) for t in types.values())
    assert 0.07 <= share <= 0.13
    # no-target refs point at no annotation but still name a category
    for r in refs:
        assert (r["ann_id"] == -1) == (r["expr_type"] == "no_target")
        assert 1 <= r["category_id"] <= len(KINDS)


def test_masks_visible_and_large_enough(synthref_root: Path) -> None:
    inst, refs, _ = _load(synthref_root)
    anns = {a["id"]: a for a in inst["annotations"]}
    for a in inst["annotations"]:
        m = decode_rle(a["segmentation"])
        assert m.shape == (128, 128)
        assert int(m.sum()) == a["area"] >= MIN_VISIBLE_PX
        # at least half of the unoccluded (equal-area disc) size stays visible
        assert a["area"] >= 0.5 * np.pi * a["attributes"]["size"] ** 2 * 0.85
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    for r in refs:
        if r["ann_id"] != -1:
            assert anns[r["ann_id"]]["image_id"] == r["image_id"]
            assert anns[r["ann_id"]]["category_id"] == r["category_id"]
    per_image = Counter(a["image_id"] for a in inst["annotations"])
    assert min(per_image.values()) >= 2 and max(per_image.values()) <= 6


def test_qa_short_answers(synthref_root: Path) -> None:
    inst, _, qa = _load(synthref_root)
    colours = {"red", "green", "blue", "yellow", "purple", "orange", "white"}
    allowed = {str(i) for i in range(7)} | colours | {"left", "right", "above", "below", "yes", "no"}
    assert qa and {q["answer"] for q in qa} <= allowed
    assert all(q["question"].endswith("?") for q in qa)
    per_image = Counter(q["image_id"] for q in qa)
    assert set(per_image) == {im["id"] for im in inst["images"]} and min(per_image.values()) >= 3
    yes_no = Counter(q["answer"] for q in qa if q["answer"] in ("yes", "no"))
    assert yes_no["yes"] == yes_no["no"]
    # counting answers agree with the annotations
    by_image = defaultdict(list)
    for a in inst["annotations"]:
        by_image[a["image_id"]].append(a)
    plural = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross", "hexagons": "hexagon"}
    for q in qa:
        words = q["question"].rstrip("?").split()
        if words[:2] == ["how", "many"] and words[2] in plural:
            n = sum(KINDS[a["category_id"] - 1] == plural[words[2]] for a in by_image[q["image_id"]])
            assert q["answer"] == str(n)
