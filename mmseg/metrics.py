"""Referring-segmentation metrics (LISA / GRES definitions), mergeable across shards.

* ``ciou``  cumulative IoU: sum of intersections / sum of unions over all samples.
* ``giou``  mean of per-sample IoU; a sample whose prediction and ground truth are both
  empty (union 0) counts as IoU 1.0 (the correct answer for a no-target expression).
* ``prec@t`` share of samples with IoU >= t, t in 0.5 .. 0.9 (empty union counts as 1).
* ``box_acc@0.5`` share of samples where the box of the predicted mask has IoU >= 0.5
  with the box of the ground-truth mask (both empty counts as correct).
* ``no_target_acc`` share of no-target samples predicted empty (``None`` if there are none).

Masks are bool (H, W) arrays of the same size (normally the original image size).
No-target samples take part in every metric with an empty ground truth, as in GRES.

The accumulator keeps one small integer record per sample and computes floats only in
:meth:`SegMetrics.compute` (with ``math.fsum``, which is exact), so splitting an
evaluation into shards and merging gives bit-identical numbers whatever the order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from mmseg.masks import mask_to_box

__all__ = ["PREC_THRESHOLDS", "SampleRecord", "SegMetrics", "box_iou", "mask_iou_stats"]

# IoU thresholds for prec@t, in tenths so the test ``I / U >= t`` can be done in integers.
PREC_THRESHOLDS: tuple[int, ...] = (5, 6, 7, 8, 9)

Box = tuple[float, float, float, float]


def _to_numpy_bool(mask: Any) -> np.ndarray:
    """numpy bool view of a mask given as numpy array or torch tensor (nonzero = True)."""
    if hasattr(mask, "detach"):  # torch tensor without importing torch here
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    return arr if arr.dtype == np.bool_ else arr > 0


def mask_iou_stats(pred: Any, gt: Any) -> tuple[int, int]:
    """Return (intersection, union) pixel counts of two bool (H, W) masks of the same shape."""
    p = _to_numpy_bool(pred)
    g = _to_numpy_bool(gt)
    if p.shape != g.shape:
        raise ValueError(
            f"pred mask shape {p.shape} != gt mask shape {g.shape}; resize the prediction to the "
            "ground-truth (original image) size first, e.g. with mmseg.masks.resize_logits"
        )
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return inter, union


def box_iou(a: Box | None, b: Box | None) -> float:
    """IoU of two XYXY boxes. ``None`` or zero-area boxes have IoU 0 with anything."""
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class SampleRecord:
    """Everything the metrics need about one evaluated sample (all integers/bools).

    ``box_hit`` is whether the predicted mask's box matches the gt mask's box at IoU 0.5.
    """

    intersection: int
    union: int
    box_hit: bool
    has_target: bool
    pred_empty: bool
    failed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleRecord":
        return cls(
            intersection=int(d["intersection"]),
            union=int(d["union"]),
            box_hit=bool(d["box_hit"]),
            has_target=bool(d["has_target"]),
            pred_empty=bool(d["pred_empty"]),
            failed=bool(d["failed"]),
        )


class SegMetrics:
    """Accumulates per-sample records; ``compute()`` turns them into the metric dict.

    Usage::

        m = SegMetrics()
        for pred, gt, has_target in ...:
            m.update(pred, gt, has_target=has_target)
        m.compute()  # {"ciou": ..., "giou": ..., "prec@0.5": ..., ...}

    Shards: ``a.merge(b)`` or ``SegMetrics.from_records(r1 + r2)``; records serialise with
    ``SampleRecord.to_dict`` for shipping between processes.
    """

    def __init__(self, records: Iterable[SampleRecord] = ()) -> None:
        self.records: list[SampleRecord] = list(records)

    @classmethod
    def from_records(cls, records: Iterable[SampleRecord | dict[str, Any]]) -> "SegMetrics":
        return cls(r if isinstance(r, SampleRecord) else SampleRecord.from_dict(r) for r in records)

    def __len__(self) -> int:
        return len(self.records)

    def update(self, pred: Any, gt: Any, has_target: bool = True, failed: bool = False) -> SampleRecord:
        """Add one sample.

        Args:
            pred: predicted bool (H, W) mask; may be ``None`` when ``failed`` (counted as empty).
            gt: ground-truth bool (H, W) mask; may be ``None`` for a no-target sample
                (counted as empty at the prediction's size).
            has_target: False for a no-target expression (its gt must be empty).
            failed: the model produced no usable answer (e.g. unparsable output).
        Returns the record that was stored.
        """
        if pred is None and gt is None:
            raise ValueError("pred and gt cannot both be None")
        if gt is None:
            if has_target:
                raise ValueError("gt is None but has_target=True")
            gt_np = np.zeros(_to_numpy_bool(pred).shape, dtype=bool)
        else:
            gt_np = _to_numpy_bool(gt)
        if pred is None:
            if not failed:
                raise ValueError("pred is None; pass failed=True for a sample without a prediction")
            pred_np = np.zeros(gt_np.shape, dtype=bool)
        else:
            pred_np = _to_numpy_bool(pred)
        if not has_target and gt_np.any():
            raise ValueError("has_target=False but the gt mask is not empty")
        inter, union = mask_iou_stats(pred_np, gt_np)
        pred_box, gt_box = mask_to_box(pred_np), mask_to_box(gt_np)
        if pred_box is None or gt_box is None:
            box_hit = pred_box is None and gt_box is None
        else:
            box_hit = box_iou(pred_box, gt_box) >= 0.5
        rec = SampleRecord(
            intersection=inter,
            union=union,
            box_hit=box_hit,
            has_target=bool(has_target),
            pred_empty=not pred_np.any(),
            failed=bool(failed),
        )
        self.records.append(rec)
        return rec

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        """Append ``other``'s records to this accumulator (in place) and return self."""
        self.records.extend(other.records)
        return self

    def compute(self) -> dict[str, Any]:
        """Return ``{ciou, giou, prec@0.5..prec@0.9, box_acc@0.5, no_target_acc, n, n_no_target, failures}``.

        Float metrics are ``None`` when there are no samples.
        """
        recs = self.records
        n = len(recs)
        out: dict[str, Any] = {"n": n, "failures": sum(r.failed for r in recs)}
        no_target = [r for r in recs if not r.has_target]
        out["n_no_target"] = len(no_target)
        if n == 0:
            out.update({"ciou": None, "giou": None, "box_acc@0.5": None, "no_target_acc": None})
            out.update({f"prec@0.{t}": None for t in PREC_THRESHOLDS})
            return out
        sum_i = sum(r.intersection for r in recs)
        sum_u = sum(r.union for r in recs)
        # all-empty evaluation (every union 0) is perfect agreement
        out["ciou"] = sum_i / sum_u if sum_u > 0 else 1.0
        out["giou"] = math.fsum(r.intersection / r.union if r.union > 0 else 1.0 for r in recs) / n
        for t in PREC_THRESHOLDS:
            # I/U >= t/10  <=>  10*I >= t*U, exact in integers; union 0 counts as IoU 1
            hits = sum(1 for r in recs if r.union == 0 or 10 * r.intersection >= t * r.union)
            out[f"prec@0.{t}"] = hits / n
        out["box_acc@0.5"] = sum(r.box_hit for r in recs) / n
        out["no_target_acc"] = sum(r.pred_empty for r in no_target) / len(no_target) if no_target else None
        return out
