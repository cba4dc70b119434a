"""The evaluator's run loop: resume after a kill, refusal of a foreign run folder, failures, batching, parquet."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from eval.compare import compare_table
from eval.layouts import DataError, ParquetReferDataset, detect_layout, open_dataset, sample_keys
from eval.runner import RunDirError, run_eval
from mmseg.data.refer import ReferDataset
from mmseg.predictor import Answer, Segmenter
from tiny import force_answer, tiny_model

LIMIT = 30
QUIET = {"report": False, "log": lambda s: None}


class ShiftSegmenter:
    """A fake model with known masks: the ground truth shifted by (sent_id % 5) pixels, or none for every 7th
    sentence; ``kill_at``: raise KeyboardInterrupt (a kill) on that call."""

    def __init__(self, dataset, n, kill_at=None):
        self.table = {}
        for i in range(n):
            s = dataset[i]
            mask = np.roll(s.mask, s.sent_id % 5, axis=1)
            self.table[(str(s.image_path), f"Please segment {s.sentence}.")] = [] if s.sent_id % 7 == 0 else [mask]
        self.kill_at, self.calls = kill_at, 0

    def batch(self, conversations, images, **options):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt
        return [Answer(text="<seg>", masks=self.table[(str(im), c[-1]["content"])]) for c, im in zip(conversations, images)]


@pytest.fixture(scope="module")
def val(synthref_root):
    return ReferDataset(synthref_root, "synthref", "unc", "val")


@pytest.fixture(scope="module")
def reference(val, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    metrics = run_eval(ShiftSegmenter(val, LIMIT), val, out, settings={"model": "shift"}, limit=LIMIT, batch_size=4, **QUIET)
    return out, metrics


def strip(metrics):
    return {k: v for k, v in metrics.items() if k != "timing"}


def lines_of(folder):
    out = []
    for raw in (folder / "predictions.jsonl").read_text().splitlines():
        line = json.loads(raw)
        line.pop("ms")
        out.append(line)
    return out


def test_reference_run_is_nontrivial(reference, val):
    out, metrics = reference
    assert metrics["n"] == LIMIT and 0.2 < metrics["ciou"] < 1.0 and metrics["n_no_target"] > 0
    assert [x["idx"] for x in lines_of(out)] == list(range(LIMIT))
    keys = sample_keys(val)
    assert keys == [(val[i].ref_id, val[i].sent_id) for i in range(len(val))]
    assert json.loads((out / "metrics.json").read_text())["protocol"]["n"] == LIMIT


def test_resume_after_a_kill_equals_an_uninterrupted_run(reference, val, tmp_path):
    ref_dir, ref_metrics = reference
    with pytest.raises(KeyboardInterrupt):
        run_eval(ShiftSegmenter(val, LIMIT, kill_at=3), val, tmp_path, settings={"model": "shift"}, limit=LIMIT,
                 batch_size=4, **QUIET)
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 8 and not (tmp_path / "metrics.json").exists()
    assert "partial 8/30" in compare_table([tmp_path])
    seg = ShiftSegmenter(val, LIMIT)
    metrics = run_eval(seg, val, tmp_path, settings={"model": "shift"}, limit=LIMIT, batch_size=7, **QUIET)
    assert strip(metrics) == strip(ref_metrics) and metrics["timing"]["samples_this_run"] == LIMIT - 8
    assert strip(json.loads((tmp_path / "metrics.json").read_text())) == strip(json.loads((ref_dir / "metrics.json").read_text()))
    assert lines_of(tmp_path) == lines_of(ref_dir)


def test_resume_after_a_line_cut_in_half(reference, val, tmp_path):
    ref_dir, ref_metrics = reference
    shutil.copy(ref_dir / "run.json", tmp_path / "run.json")
    raw = (ref_dir / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "predictions.jsonl").write_bytes(b"".join(raw[:11]) + raw[11][: len(raw[11]) // 2])
    metrics = run_eval(ShiftSegmenter(val, LIMIT), val, tmp_path, settings={"model": "shift"}, limit=LIMIT, **QUIET)
    assert strip(metrics) == strip(ref_metrics) and metrics["timing"]["samples_this_run"] == LIMIT - 11
    assert lines_of(tmp_path) == lines_of(ref_dir)


def test_resume_merges_the_files_of_a_killed_sharded_run(reference, val, tmp_path):
    ref_dir, ref_metrics = reference
    shutil.copy(ref_dir / "run.json", tmp_path / "run.json")
    raw = (ref_dir / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "predictions.rank0.jsonl").write_bytes(b"".join(raw[0:20:2]) + raw[2] + b'{"idx": 5, "ref')
    (tmp_path / "predictions.rank1.jsonl").write_bytes(b"".join(raw[1:16:2]) + b"not json\n")
    metrics = run_eval(ShiftSegmenter(val, LIMIT), val, tmp_path, settings={"model": "shift"}, limit=LIMIT, **QUIET)
    assert strip(metrics) == strip(ref_metrics) and metrics["timing"]["samples_this_run"] == LIMIT - 18
    assert lines_of(tmp_path) == lines_of(ref_dir) and not list(tmp_path.glob("predictions.rank*"))


def test_a_folder_of_another_run_is_refused(reference, val, tmp_path):
    ref_dir, _ = reference
    shutil.copytree(ref_dir, tmp_path / "run")
    seg = ShiftSegmenter(val, LIMIT)
    with pytest.raises(RunDirError, match=r"different settings(.|\n)*prompt: 'Please segment \{expression\}\.'"):
        run_eval(seg, val, tmp_path / "run", settings={"model": "shift"}, limit=LIMIT, prompt="Segment {expression}.", **QUIET)
    with pytest.raises(RunDirError, match="limit: 30 in run.json, now 10"):
        run_eval(seg, val, tmp_path / "run", settings={"model": "shift"}, limit=10, **QUIET)
    with pytest.raises(RunDirError, match="model: 'shift' in run.json, now 'other'"):
        run_eval(seg, val, tmp_path / "run", settings={"model": "other"}, limit=LIMIT, **QUIET)
    (tmp_path / "run" / "run.json").unlink()
    with pytest.raises(RunDirError, match="no run.json"):
        run_eval(seg, val, tmp_path / "run", settings={"model": "shift"}, limit=LIMIT, **QUIET)




@pytest.fixture(scope="module")
def segmenter():
    model, proc = tiny_model(seed=3)
    model.head.constrain = force_answer([proc.seg_token_id, proc.eos_token_id])
    return Segmenter(model, proc)


def test_batching_gives_the_masks_of_batch_size_one_and_a_corrupt_image_is_a_counted_failure(segmenter, synthref_root, tmp_path):
    n = 10
    clean = ReferDataset(synthref_root, "synthref", "unc", "val")
    m1 = run_eval(segmenter, clean, tmp_path / "bs1", limit=n, batch_size=1, **QUIET)
    m5 = run_eval(segmenter, clean, tmp_path / "bs5", limit=n, batch_size=5, **QUIET)
    assert lines_of(tmp_path / "bs1") == lines_of(tmp_path / "bs5") and strip(m1) == strip(m5)
    assert any(not x["pred_empty"] for x in lines_of(tmp_path / "bs1")) and m1["failures"] == 0

    images = tmp_path / "images"
    shutil.copytree(synthref_root / "images", images)
    bad = clean[3].image_path.name
    (images / bad).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    corrupt = ReferDataset(synthref_root, "synthref", "unc", "val", image_root=images)
    m = run_eval(segmenter, corrupt, tmp_path / "corrupt", limit=n, batch_size=4, **QUIET)
    hit = [i for i in range(n) if clean[i].image_path.name == bad]
    assert m["n"] == n and m["failures"] == len(hit) and [f["idx"] for f in m["failed_samples"]] == hit
    assert all("ImageError" in f["reason"] and bad in f["reason"] for f in m["failed_samples"])
    for got, want in zip(lines_of(tmp_path / "corrupt"), lines_of(tmp_path / "bs1")):
        if got["idx"] in hit:
            assert got["failed"] and got["pred_empty"] and got["intersection"] == 0
            assert got["union"] == int(clean[got["idx"]].mask.sum())  # the empty mask scored against the truth
        else:
            assert got == want


def write_parquet(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(w, h, color):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), color).save(buf, format="PNG")
        return buf.getvalue()

    (root / "data").mkdir(parents=True)
    Image.new("RGB", (50, 20), (0, 0, 255)).save(root / "data" / "b.png")
    rows = [
        {"question_id": "q0", "image": {"bytes": png(40, 30, (255, 0, 0)), "path": None}, "question": "caption?",
         "answer": ["left box", "the box on the left"], "segmentation": [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0],
         "bbox": [2.0, 2.0, 10.0, 10.0], "iscrowd": 0, "file_name": "a.png"},
        {"question_id": "q1", "image": {"bytes": None, "path": "b.png"}, "question": "caption?",
         "answer": ["the blue one"], "segmentation": [20.0, 5.0, 30.0, 5.0, 30.0, 15.0, 20.0, 15.0],
         "bbox": [20.0, 5.0, 10.0, 10.0], "iscrowd": 0, "file_name": "b.png"},
        {"question_id": "q2", "image": {"bytes": png(16, 16, (0, 255, 0)), "path": None}, "question": "caption?",
         "answer": ["x", "y", "z"], "segmentation": [0.0, 0.0, 8.0, 0.0, 8.0, 8.0, 0.0, 8.0],
         "bbox": [0.0, 0.0, 8.0, 8.0], "iscrowd": 0, "file_name": "c.png"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "val-00000-of-00001.parquet", row_group_size=2)


def test_lmms_lab_parquet_layout(tmp_path):
    write_parquet(tmp_path)
    assert detect_layout(tmp_path) == "parquet"
    ds, notes = open_dataset("auto", tmp_path, "refcoco", "unc", "val")
    assert isinstance(ds, ParquetReferDataset) and any("NOT the UNC val" in n for n in notes)
    assert len(ds) == 6 and [s for _, s in sample_keys(ds)] == list(range(6))
    s0, s2, s5 = ds[0], ds[2], ds[5]
    assert isinstance(s0.image_path, Image.Image) and s0.mask.shape == (30, 40) and s0.mask.sum() > 50
    assert s0.box == (2.0, 2.0, 12.0, 12.0) and s0.question_id == "q0" and s0.sentence == "left box"
    assert s2.image_path == tmp_path / "data" / "b.png" and s2.mask.shape == (20, 50) and s2.ref_id == 1
    assert s5.sentence == "z" and s5.mask.shape == (16, 16) and s5.has_target

    class GroundTruth:
        def batch(self, conversations, images, **options):
            return [Answer(text="<seg>", masks=[ds[[ds[i].sentence for i in range(len(ds))].index(
                c[-1]["content"][len("Please segment "):-1])].mask]) for c in conversations]

    m = run_eval(GroundTruth(), ds, tmp_path / "run", batch_size=4, log=lambda s: None)
    assert m["n"] == 6 and m["ciou"] == 1.0 and m["failures"] == 0
    assert json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])["question_id"] == "q0"
    assert (tmp_path / "run" / "report.html").is_file()
    with pytest.raises(DataError, match=r"no parquet files for split 'testA'(.|\n)*splits found: val(.|\n)*expected layout"):
        open_dataset("parquet", tmp_path, "refcoco", "unc", "testA")
