"""Inference, scoring, streaming, resume and sharding.

:func:`run_eval` takes any object with ``batch(conversations, images, **options) -> list[answer]`` (answers
with ``.text`` and ``.masks``: bool (H, W) arrays at the original image size), e.g. :class:`mmseg.Segmenter`,
and a dataset with the :class:`mmseg.data.ReferSample` interface.

Files in the run folder:

* ``run.json``: the run's settings; a rerun with different settings is refused.
* ``predictions.jsonl``: one line per sentence, in the fixed sample order once the run is complete:
  ``idx, ref_id, sent_id, image_id, sentence, text, rle, ms`` and the integer record ``intersection, union,
  box_hit, has_target, pred_empty, failed, reason``, so metrics recompute from the file without decoding.
  Lines are flushed and fsync'ed after every batch; a rerun drops a trailing partial line and skips the
  samples already there (matched by ``idx`` and checked against ``(ref_id, sent_id)``).
* ``predictions.rank{r}.jsonl``: per-process files while sharded; merged into ``predictions.jsonl`` by the
  main process (sorted, duplicates dropped) at the start and at the end of every run.
* ``metrics.json``, ``report.md``, ``report.html``: written when every sample is done.

Sharding: process ``r`` of ``n`` takes the samples still to do ``r::n`` (no padding, no sample twice);
metrics are computed from the merged integer records, so they are identical to one process.

Mask size policy: a predicted mask whose size differs from the ground truth's (the original image size) is
an error in the model output; the sample counts as a failure (empty mask) with the reason, never resized.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmseg.data.prompts import EVAL_TEMPLATE
from mmseg.masks import encode_rle
from mmseg.metrics import SegMetrics

from eval.layouts import DataError, sample_keys

__all__ = ["METRICS_FILE", "PREDICTIONS_FILE", "RUN_FILE", "RunDirError", "consolidate", "iou", "read_lines",
           "run_eval", "score"]

PREDICTIONS_FILE = "predictions.jsonl"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
MASK_SIZE_POLICY = "failure"  # a mask of another size than the ground truth is a failed sample (not resized)
RECORD_KEYS = ("intersection", "union", "box_hit", "has_target", "pred_empty", "failed")
METRIC_KEYS = ("ciou", "giou", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9", "box_acc@0.5",
               "no_target_acc", "n", "n_no_target", "failures")


class RunDirError(ValueError):
    """The output folder belongs to another run (different settings) or is not an evaluator run folder."""


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    state: Any = None

    @classmethod
    def of(cls, state: Any) -> "_Dist":
        if state is None:
            return cls()
        return cls(int(state.process_index), int(state.num_processes), state)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


# -- scoring -----------------------------------------------------------------------------------------------
def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 500 else text[:497] + "..."


def score(sample: Any, answer: Any = None, reason: str | None = None) -> dict[str, Any]:
    """One prediction line (without ``idx`` and ``ms``) for ``sample`` and the model's ``answer``.

    The prediction is the union of the answer's masks; the ground truth is binarised ``> 0``; both at the
    original image size. ``reason`` (or a mask of the wrong size) makes a failed sample: empty prediction.
    """
    gt = np.asarray(sample.mask) > 0
    pred: np.ndarray | None = None
    if reason is None:
        if answer is None:
            reason = "no answer"
        else:
            pred = np.zeros(gt.shape, dtype=bool)
            for k, mask in enumerate(answer.masks):
                m = np.asarray(mask)
                if m.shape != gt.shape:
                    got = "x".join(str(v) for v in m.shape[::-1])
                    reason = (f"mask {k} of the answer is {got} (WxH) but the image is {gt.shape[1]}x{gt.shape[0]}: "
                              "masks must come at the original image size")
                    pred = None
                    break
                pred |= m > 0
    failed = reason is not None
    record = SegMetrics().update(pred, gt, has_target=bool(sample.has_target), failed=failed)
    line: dict[str, Any] = {
        "ref_id": int(sample.ref_id), "sent_id": int(sample.sent_id), "image_id": int(sample.image_id),
        "sentence": str(sample.sentence), "text": "" if answer is None or failed else str(answer.text),
        "rle": encode_rle(pred if pred is not None else np.zeros(gt.shape, dtype=bool)),
        **record.to_dict(), "reason": reason,
    }
    qid = getattr(sample, "question_id", None)
    if qid is not None:
        line["question_id"] = qid
    return line


def iou(line: dict[str, Any]) -> float:
    """Per-sample IoU from a prediction line; an empty union scores 1 (as in gIoU)."""
    return line["intersection"] / line["union"] if line["union"] > 0 else 1.0


def _predict(segmenter: Any, samples: Sequence[Any], prompt: str, options: dict[str, Any]) -> list[tuple[Any, str | None, float]]:
    """``(answer, reason, ms)`` per sample; a batch that raises is retried one by one to isolate the failures."""
    conversations = [[{"role": "user", "content": prompt.format(expression=s.sentence)}] for s in samples]
    start = time.perf_counter()
    try:
        answers = list(segmenter.batch(conversations, [s.image_path for s in samples], **options))
        if len(answers) != len(samples):
            raise RuntimeError(f"the segmenter returned {len(answers)} answers for {len(samples)} queries")
    except Exception as err:  # noqa: BLE001 - any model/image error is a counted failure, the run goes on
        if len(samples) == 1:
            return [(None, _reason(err), (time.perf_counter() - start) * 1000.0)]
        out: list[tuple[Any, str | None, float]] = []
        for s in samples:
            out.extend(_predict(segmenter, [s], prompt, options))
        return out
    ms = (time.perf_counter() - start) * 1000.0 / len(samples)
    return [(a, None, ms) for a in answers]


# -- files -------------------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _valid(line: Any, keys: Sequence[tuple[int, int]]) -> bool:
    if not isinstance(line, dict) or not isinstance(line.get("idx"), int):
        return False
    idx = line["idx"]
    if not 0 <= idx < len(keys) or (line.get("ref_id"), line.get("sent_id")) != keys[idx]:
        return False
    rle = line.get("rle")
    return all(k in line for k in RECORD_KEYS) and isinstance(rle, dict) and "counts" in rle and "size" in rle


def read_lines(path: Path) -> tuple[list[tuple[dict[str, Any], bytes]], int]:
    """Parsed JSON lines of ``path`` with their bytes, and how many lines were unreadable (e.g. cut by a kill)."""
    if not path.is_file():
        return [], 0
    out, bad = [], 0
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            out.append((json.loads(raw), raw))
        except ValueError:
            bad += 1
    return out, bad


def _rank_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("predictions.rank*.jsonl"))


def consolidate(out_dir: Path, keys: Sequence[tuple[int, int]]) -> tuple[list[dict[str, Any]], int]:
    """Merge ``predictions.jsonl`` and the per-rank files into ``predictions.jsonl``: valid lines only, one per
    sample (the first seen), sorted by ``idx``; written atomically, then the rank files are removed.
    Returns the lines and the number of dropped (partial, invalid or duplicate) lines."""
    by_idx: dict[int, tuple[dict[str, Any], bytes]] = {}
    dropped = 0
    for path in [out_dir / PREDICTIONS_FILE, *_rank_files(out_dir)]:
        lines, bad = read_lines(path)
        dropped += bad
        for line, raw in lines:
            if not _valid(line, keys) or line["idx"] in by_idx:
                dropped += 1
                continue
            by_idx[line["idx"]] = (line, raw)
    ordered = [by_idx[i] for i in sorted(by_idx)]
    _write_atomic(out_dir / PREDICTIONS_FILE, b"".join(raw + b"\n" for _, raw in ordered))
    for path in _rank_files(out_dir):
        path.unlink()
    return [line for line, _ in ordered], dropped


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(settings, default=str))


def _check_run_dir(out_dir: Path, settings: dict[str, Any]) -> bool:
    """True if ``out_dir`` holds an earlier run with the same settings; raise if it holds another run."""
    run_file = out_dir / RUN_FILE
    if not run_file.is_file():
        if (out_dir / PREDICTIONS_FILE).exists() or _rank_files(out_dir):
            raise RunDirError(f"{out_dir} holds predictions but no {RUN_FILE}: it was not made by this evaluator; "
                              "use another --out")
        return False
    try:
        stored = json.loads(run_file.read_text(encoding="utf-8"))["settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise RunDirError(f"{run_file} is unreadable ({err}); use another --out or delete {out_dir}") from None
    diffs = [f"  {k}: {stored.get(k)!r} in {RUN_FILE}, now {settings.get(k)!r}"
             for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
    if diffs:
        raise RunDirError(
            f"{out_dir} holds a run made with different settings, so it cannot be resumed:\n" + "\n".join(diffs)
            + f"\nuse another --out, or delete {out_dir} to start over"
        )
    return True


# -- the run -----------------------------------------------------------------------------------------------
def run_eval(
    segmenter: Any,
    dataset: Any,
    out_dir: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    prompt: str = EVAL_TEMPLATE,
    batch_size: int = 16,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    state: Any = None,
    progress: bool = False,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Evaluate the first ``limit`` samples (all if None) of ``dataset`` into ``out_dir``, resuming what is there.

    ``settings`` describe the run (model, data, split ...) and are stored in ``run.json`` and ``metrics.json``;
    ``state`` is an ``accelerate.PartialState`` (None = one process). Returns the metrics on the main process
    (None on the others)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    dist = _Dist.of(state)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(options or {})
    keys = sample_keys(dataset)
    n_split = len(keys)
    keys = keys[:limit] if limit is not None else keys
    n = len(keys)
    sha = hashlib.sha1("".join(f"{r}:{s};" for r, s in keys).encode()).hexdigest()
    full = _normalise({**(settings or {}), "prompt": prompt, "limit": limit, "n": n, "n_split": n_split,
                       "samples_sha1": sha, "mask_size_policy": MASK_SIZE_POLICY, **({"options": options} if options else {})})
    existed = _check_run_dir(out, full)  # every rank checks (read-only) so that all fail together
    dist.barrier()
    if dist.main:
        if not existed:
            _write_atomic(out / RUN_FILE, (json.dumps({"settings": full}, indent=2) + "\n").encode())
        _, dropped = consolidate(out, keys)
        if dropped:
            log(f"note: dropped {dropped} partial, invalid or duplicate prediction line(s) (samples without a valid "
                "line are redone)")
    dist.barrier()
    done = {line["idx"] for line, _ in read_lines(out / PREDICTIONS_FILE)[0]}
    todo = [i for i in range(n) if i not in done]
    mine = todo[dist.rank :: dist.world]
    if dist.main and done:
        log(f"resuming {out}: {len(done)} of {n} samples already done, {len(todo)} to go")

    path = out / (PREDICTIONS_FILE if dist.world == 1 else f"predictions.rank{dist.rank}.jsonl")
    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="sample", desc=f"eval (rank 0 of {dist.world})" if dist.world > 1 else "eval",
                   dynamic_ncols=True)
    start = time.perf_counter()
    with open(path, "a", encoding="utf-8") as writer:
        for b in range(0, len(mine), batch_size):
            chunk = mine[b : b + batch_size]
            samples = [_load(dataset, i, keys) for i in chunk]
            lines = []
            for i, sample, (answer, reason, ms) in zip(chunk, samples, _predict(segmenter, samples, prompt, options)):
                lines.append({"idx": i, **score(sample, answer, reason), "ms": round(ms, 3)})
            writer.write("".join(_dumps(line) + "\n" for line in lines))
            writer.flush()
            os.fsync(writer.fileno())
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    dist.barrier()
    if not dist.main:
        return None
    wall = time.perf_counter() - start
    lines, _ = consolidate(out, keys)
    if len(lines) != n:  # cannot happen unless files were edited during the run
        raise RunDirError(f"{out}: {len(lines)} of {n} samples in {PREDICTIONS_FILE} after the run; rerun to finish")
    metrics = compute_metrics(lines)
    metrics["protocol"] = full
    metrics["timing"] = {
        "wall_s": round(wall, 3), "samples_this_run": len(todo),
        "samples_per_s": round(len(todo) / wall, 3) if todo and wall > 0 else None,
        "mean_ms_per_sample": round(math.fsum(line["ms"] for line in lines) / n, 3) if n else None,
        "processes": dist.world, "batch_size": batch_size,
    }
    _write_atomic(out / METRICS_FILE, (json.dumps(metrics, indent=2) + "\n").encode())
    if report:
        from eval.report import write_reports

        write_reports(out, metrics, lines, dataset)
    return metrics


def compute_metrics(lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics from prediction lines (their integer records), plus the list of failed samples with reasons."""
    computed = SegMetrics.from_records(lines).compute()
    metrics = {k: computed[k] for k in METRIC_KEYS}
    metrics["failed_samples"] = [
        {"idx": line["idx"], "ref_id": line["ref_id"], "sent_id": line["sent_id"], "reason": line.get("reason")}
        for line in lines if line["failed"]
    ]
    return metrics


def _load(dataset: Any, idx: int, keys: Sequence[tuple[int, int]]) -> Any:
    try:
        sample = dataset[idx]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - the ground truth itself is unreadable: no honest score exists
        raise DataError(f"sample {idx} (ref_id {keys[idx][0]}, sent_id {keys[idx][1]}) cannot be loaded, so its "
                        f"ground truth is unknown: {_reason(err)}") from None
    if (int(sample.ref_id), int(sample.sent_id)) != tuple(keys[idx]):
        raise DataError(f"sample {idx} is ref_id {sample.ref_id}, sent_id {sample.sent_id}, expected {keys[idx]}: "
                        "the dataset's order changed")
    return sample
