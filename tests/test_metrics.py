"""Segmentation metrics: hand-built cases, agreement with pycocotools, shard merging."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mmseg.metrics import SampleRecord, SegMetrics, box_iou, mask_iou_stats


def _m(h: int, w: int, *rects: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    for x1, y1, x2, y2 in rects:
        m[y1:y2, x1:x2] = True
    return m


def test_hand_built_cases() -> None:
    gt = _m(10, 10, (0, 0, 4, 5))  # 20 px
    pred = _m(10, 10, (2, 0, 6, 5))  # 20 px, 10 overlap
    assert mask_iou_stats(pred, gt) == (10, 30)
    empty = np.zeros((10, 10), dtype=bool)
    assert mask_iou_stats(empty, gt) == (0, 20)
    assert mask_iou_stats(pred, empty) == (0, 20)
    assert mask_iou_stats(empty, empty) == (0, 0)

    m = SegMetrics()
    m.update(pred, gt)  # IoU 1/3
    m.update(gt, gt)  # IoU 1
    m.update(empty, gt)  # IoU 0, empty prediction
    m.update(empty, None, has_target=False)  # correct no-target: IoU 1
    m.update(pred, empty, has_target=False)  # wrong no-target: IoU 0
    m.update(None, gt, failed=True)  # failed: counted as empty
    r = m.compute()
    assert r["n"] == 6 and r["failures"] == 1 and r["n_no_target"] == 2
    assert r["ciou"] == pytest.approx((10 + 20) / (30 + 20 + 20 + 0 + 20 + 20))
    assert r["giou"] == pytest.approx((1 / 3 + 1 + 0 + 1 + 0 + 0) / 6)
    assert r["prec@0.5"] == pytest.approx(2 / 6) and r["prec@0.9"] == pytest.approx(2 / 6)
    assert r["no_target_acc"] == 0.5
    # boxes: pred/gt box IoU 1/3 -> miss; gt/gt hit; empty vs gt miss; empty/empty hit; pred vs empty miss; failed miss
    assert r["box_acc@0.5"] == pytest.approx(2 / 6)


def test_both_empty_and_edge_cases() -> None:
    m = SegMetrics()
    assert m.compute()["ciou"] is None and m.compute()["n"] == 0
    empty = np.zeros((4, 4), dtype=bool)
    m.update(empty, empty, has_target=False)
    r = m.compute()
    assert r["giou"] == 1.0 and r["ciou"] == 1.0 and r["prec@0.9"] == 1.0 and r["box_acc@0.5"] == 1.0
    assert r["no_target_acc"] == 1.0
    only_targets = SegMetrics()
    only_targets.update(np.ones((4, 4), bool), np.ones((4, 4), bool))
    assert only_targets.compute()["no_target_acc"] is None
    # IoU exactly at a threshold counts (integer comparison, no float rounding): 7/10
    t = SegMetrics()
    t.update(_m(1, 10, (0, 0, 7, 1)), _m(1, 10, (0, 0, 10, 1)))
    assert t.compute()["prec@0.7"] == 1.0 and t.compute()["prec@0.8"] == 0.0


def test_shape_mismatch_and_bad_calls() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\) != gt mask shape \(5, 5\)"):
        mask_iou_stats(np.zeros((4, 4), bool), np.zeros((5, 5), bool))
    m = SegMetrics()
    with pytest.raises(ValueError):
        m.update(np.zeros((4, 4), bool), np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="failed=True"):
        m.update(None, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="not empty"):
        m.update(np.zeros((4, 4), bool), np.ones((4, 4), bool), has_target=False)


def test_iou_matches_pycocotools() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w = rng.integers(5, 40, size=2)
        a, b = rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()
        if not (a | b).any():
            continue
        i, u = mask_iou_stats(a, b)
        ra = mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
        rb = mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))
        assert i / u == pytest.approx(float(mask_utils.iou([ra], [rb], [0])[0, 0]))


def test_box_iou() -> None:
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0 and box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_merge_of_shards_equals_whole() -> None:
    rng = np.random.default_rng(2)
    samples = []
    for k in range(40):
        gt = rng.random((16, 16)) < 0.3 if k % 5 else np.zeros((16, 16), bool)
        pred = rng.random((16, 16)) < 0.3 if k % 7 else np.zeros((16, 16), bool)
        samples.append((pred, gt, bool(gt.any())))
    whole = SegMetrics()
    for p, g, t in samples:
        whole.update(p, g, has_target=t)
    a, b = SegMetrics(), SegMetrics()
    for k, (p, g, t) in enumerate(samples):
        (a if k % 2 else b).update(p, g, has_target=t)
    merged = SegMetrics().merge(b).merge(a)  # different order on purpose
    assert merged.compute() == whole.compute()
    # records survive a JSON trip between processes
    shipped = json.loads(json.dumps([r.to_dict() for r in a.records + b.records]))
    assert SegMetrics.from_records(shipped).compute() == whole.compute()
    assert isinstance(whole.records[0], SampleRecord)
