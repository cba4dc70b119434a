"""The evaluator's scoring on hand-built cases, against pycocotools, and its reports (no model needed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from eval.compare import compare_table
from eval.report import html_report, markdown_report, peers_table
from eval.runner import compute_metrics, iou, run_eval, score
from mmseg.masks import decode_rle
from mmseg.predictor import Answer


def sample(gt, has_target=None, idx=0, sentence="the thing"):
    gt = np.asarray(gt)
    return SimpleNamespace(image_path=f"img{idx}.png", sentence=sentence, mask=gt, box=(0, 0, 0, 0), ref_id=idx,
                           sent_id=100 + idx, image_id=idx, has_target=bool(gt.any()) if has_target is None else has_target)


def square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_empty_prediction():
    line = score(sample(square(20, 30, 2, 6, 3, 8)), Answer(text="no", masks=[]))
    assert (line["intersection"], line["union"], line["box_hit"], line["pred_empty"], line["failed"]) == (0, 20, False, True, False)
    assert iou(line) == 0.0 and not decode_rle(line["rle"]).any() and line["rle"]["size"] == [20, 30]


def test_empty_ground_truth():
    line = score(sample(np.zeros((10, 10), bool)), Answer(text="<seg>", masks=[square(10, 10, 0, 2, 0, 3)]))
    assert (line["intersection"], line["union"], line["has_target"], line["pred_empty"], line["box_hit"]) == (0, 6, False, False, False)
    assert iou(line) == 0.0


def test_both_empty_scores_one():
    line = score(sample(np.zeros((10, 10), bool)), Answer(text="none", masks=[np.zeros((10, 10), bool)]))
    assert (line["intersection"], line["union"], line["box_hit"], line["pred_empty"]) == (0, 0, True, True)
    assert iou(line) == 1.0


def test_partial_overlap_and_union_of_masks():
    gt = square(40, 40, 0, 10, 0, 10)  # 100 px
    a, b = square(40, 40, 5, 15, 0, 10), square(40, 40, 0, 2, 30, 40)  # a: 50 px overlap; b: 20 px outside
    line = score(sample(gt), Answer(text="<seg> <seg>", masks=[a, b]))
    assert (line["intersection"], line["union"]) == (50, 100 + 50 + 20)
    assert line["box_hit"] is False  # box of the union spans to x=40
    line = score(sample(gt), Answer(text="<seg>", masks=[a]))
    assert (line["intersection"], line["union"], line["box_hit"]) == (50, 150, False)  # box IoU 1/3
    line = score(sample(gt), Answer(text="<seg>", masks=[square(40, 40, 1, 10, 0, 10)]))
    assert line["box_hit"] is True and line["intersection"] == 90


def test_ground_truth_is_binarised():
    gt = np.zeros((8, 8), np.uint8)
    gt[:4, :4] = 1
    gt[2:4, 2:4] = 2  # overlapping polygons decode to 2
    line = score(sample(gt), Answer(text="<seg>", masks=[gt > 0]))
    assert (line["intersection"], line["union"]) == (16, 16)


def test_mask_of_another_size_is_a_counted_failure():
    gt = square(20, 30, 2, 6, 3, 8)
    line = score(sample(gt), Answer(text="<seg>", masks=[np.ones((30, 20), bool)]))
    assert line["failed"] and "20x30 (WxH) but the image is 30x20" in line["reason"]
    assert (line["intersection"], line["union"], line["pred_empty"]) == (0, 20, True)
    assert line["rle"]["size"] == [20, 30] and not decode_rle(line["rle"]).any()
    assert line["text"] == ""


def test_iou_matches_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(25):
        h, w = rng.integers(1, 60, size=2)
        gt = rng.random((h, w)) < rng.random()
        pred = rng.random((h, w)) < rng.random()
        line = score(sample(gt), Answer(text="<seg>", masks=[pred]))
        enc = lambda m: mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))  # noqa: E731
        ref = mask_utils.iou([enc(pred)], [enc(gt)], [0])[0, 0]
        if line["union"] == 0:
            assert iou(line) == 1.0
        else:
            assert iou(line) == pytest.approx(float(ref), abs=1e-12)
        assert np.array_equal(decode_rle(line["rle"]), pred)


class TableSegmenter:
    """Answers from a table ``sentence -> masks`` (an Exception instance raises)."""

    def __init__(self, table):
        self.table, self.calls = table, 0

    def batch(self, conversations, images, **options):
        self.calls += 1
        answers = []
        for conv in conversations:
            masks = self.table[conv[-1]["content"]]
            if isinstance(masks, Exception):
                raise masks
            answers.append(Answer(text="<seg>" if masks else "none", masks=list(masks)))
        return answers


def test_run_metrics_by_hand(tmp_path):
    gt1, gt2 = square(10, 10, 0, 5, 0, 4), square(10, 10, 0, 10, 0, 10)  # 20 px, 100 px
    samples = [sample(gt1, idx=0, sentence="a"), sample(gt2, idx=1, sentence="b"),
               sample(np.zeros((10, 10), bool), idx=2, sentence="c"), sample(gt1, idx=3, sentence="d"),
               sample(np.zeros((6, 6), bool), idx=4, sentence="e")]
    table = {
        "Please segment a.": [gt1],  # I 20 / U 20
        "Please segment b.": [square(10, 10, 0, 10, 0, 6)],  # 60 / 100
        "Please segment c.": [],  # 0 / 0 -> 1
        "Please segment d.": RuntimeError("model exploded"),  # failure: 0 / 20
        "Please segment e.": [square(6, 6, 0, 1, 0, 1)],  # 0 / 1
    }
    seg = TableSegmenter(table)
    m = run_eval(seg, samples, tmp_path / "run", settings={"model": "table"}, batch_size=5, report=False, log=lambda s: None)
    assert m["ciou"] == pytest.approx(80 / 141)
    assert m["giou"] == pytest.approx((1 + 0.6 + 1 + 0 + 0) / 5)
    assert m["prec@0.5"] == pytest.approx(3 / 5) and m["prec@0.7"] == pytest.approx(2 / 5)
    assert m["no_target_acc"] == pytest.approx(1 / 2) and m["n_no_target"] == 2
    assert m["box_acc@0.5"] == pytest.approx(3 / 5)  # a, b (box IoU 0.6), c (both empty)
    assert m["n"] == 5 and m["failures"] == 1
    assert m["failed_samples"] == [{"idx": 3, "ref_id": 3, "sent_id": 103, "reason": "RuntimeError: model exploded"}]
    assert seg.calls == 1 + 5  # the failing batch is retried one by one
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [x["idx"] for x in lines] == [0, 1, 2, 3, 4] and lines[3]["failed"] and lines[3]["union"] == 20
    assert {"ref_id", "sent_id", "text", "rle", "ms"} <= set(lines[0])
    assert compute_metrics(lines)["ciou"] == m["ciou"]


def _metrics(dataset="refcoco", split="val", limit=None, layout="refer"):
    return {"ciou": 0.7512, "giou": 0.7, "prec@0.5": 0.8, "prec@0.6": 0.7, "prec@0.7": 0.6, "prec@0.8": 0.5,
            "prec@0.9": 0.1, "box_acc@0.5": 0.85, "no_target_acc": None, "n": 10, "n_no_target": 0, "failures": 1,
            "failed_samples": [{"idx": 3, "ref_id": 3, "sent_id": 9, "reason": "ImageError: cannot read"}],
            "protocol": {"dataset": dataset, "split_by": "unc", "split": split, "layout": layout, "model": "/ck/stamp-v2",
                         "head": "stamp", "prompt": "Please segment {expression}.", "limit": limit, "n": 10, "n_split": 10 if limit is None else 100}}


def test_markdown_places_our_number_beside_the_peers():
    md = markdown_report(_metrics("refcoco", "testA"))
    assert "| LISA-7B | 74.1 | 76.5 | 71.1 |" in md and "| **ours** (stamp, stamp-v2) | - | 75.12 | - |" in md
    assert "Please segment {expression}." in md and "ImageError" in md
    assert "| GLaMM | 74.2 | 74.9 |" in peers_table(_metrics("refcocog", "test"))
    synth = markdown_report(_metrics("synthref"))
    assert peers_table(_metrics("synthref")) is None and "LISA" not in synth and "| cIoU | 75.12 |" in synth
    assert "subset" in markdown_report(_metrics(limit=5))
    assert "NOT the UNC val" in markdown_report(_metrics(layout="parquet"))


def test_html_shows_best_and_worst_as_inline_pngs():
    gt = square(12, 12, 2, 8, 2, 8)
    samples = [sample(gt, idx=i) for i in range(20)]
    for s in samples:
        s.image_path = None  # unreadable image: the page shows grey and says so
    lines = [{"idx": i, "ref_id": i, "sent_id": 100 + i, "sentence": f"s{i}", "text": "", "intersection": i, "union": 36,
              "failed": False, "reason": None, "rle": score(samples[i], Answer(text="", masks=[]))["rle"]} for i in range(20)]
    page = html_report(_metrics("synthref"), lines, samples)
    assert page.count("<img src='data:image/png;base64,") == 16 * 3
    assert page.index("#19 ") < page.index("Worst") < page.index("#0 ")


def test_compare_lists_runs_and_protocol_differences(tmp_path):
    for name, split, ciou in (("a", "val", 0.5), ("b", "testA", 0.25)):
        (tmp_path / name).mkdir()
        m = _metrics("refcoco", split)
        m["ciou"] = ciou
        m["timing"] = {"samples_per_s": 12.5}
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    table = compare_table([tmp_path / "a", tmp_path / "b"])
    assert "| 50.00 |" in table and "| 25.00 |" in table and "12.5" in table
    assert "differ in split" in table
