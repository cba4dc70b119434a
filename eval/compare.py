"""``python -m eval compare RUN_DIR...``: one Markdown table across runs (heads, checkpoints, splits).

A run without ``metrics.json`` (still going, or killed) is shown from its ``predictions.jsonl`` as partial.
Settings that differ between runs (dataset, split, prompt, number of samples) are listed under the table,
because numbers from different protocols are not comparable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from eval.report import pct

__all__ = ["compare_table", "load_run"]

_COLS = (("cIoU", "ciou"), ("gIoU", "giou"), ("P@0.5", "prec@0.5"), ("P@0.7", "prec@0.7"), ("P@0.9", "prec@0.9"),
         ("box@0.5", "box_acc@0.5"), ("N-acc", "no_target_acc"))
_PROTOCOL_KEYS = ("dataset", "split_by", "split", "layout", "prompt", "limit", "n", "samples_sha1")


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The metrics of a run folder (``status``: "complete" or "partial k/n")."""
    from eval.runner import METRICS_FILE, PREDICTIONS_FILE, RUN_FILE, compute_metrics, read_lines

    folder = Path(run_dir)
    if (folder / METRICS_FILE).is_file():
        try:
            metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{folder / METRICS_FILE} is not valid JSON: {err}") from None
        return {**metrics, "status": "complete"}
    if not (folder / RUN_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an evaluation run folder (no {METRICS_FILE} nor {RUN_FILE})")
    settings = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))["settings"]
    seen: dict[int, dict[str, Any]] = {}
    for path in [folder / PREDICTIONS_FILE, *sorted(folder.glob("predictions.rank*.jsonl"))]:
        for line, _ in read_lines(path)[0]:
            if isinstance(line, dict) and "idx" in line and "union" in line:
                seen.setdefault(line["idx"], line)
    lines = [seen[i] for i in sorted(seen)]
    metrics = compute_metrics(lines) if lines else {"n": 0, "failures": 0}
    return {**metrics, "protocol": settings, "status": f"partial {len(lines)}/{settings.get('n')}"}


def compare_table(run_dirs: Sequence[str | Path]) -> str:
    runs = [(str(d), load_run(d)) for d in run_dirs]
    head = ["run", "model", "head", "data", "n", "fail", *(c for c, _ in _COLS), "samples/s", "status"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in runs:
        p = m.get("protocol", {})
        speed = (m.get("timing") or {}).get("samples_per_s")
        data = f"{p.get('dataset')}/{p.get('split_by')}/{p.get('split')}"
        rows.append("| " + " | ".join([
            name, Path(str(p.get("model"))).name, str(p.get("head")), data, str(m.get("n")), str(m.get("failures")),
            *(pct(m.get(k)) for _, k in _COLS), "-" if speed is None else f"{speed:.1f}", m["status"],
        ]) + " |")
    notes = []
    for key in _PROTOCOL_KEYS:
        values = {json.dumps(m.get("protocol", {}).get(key)) for _, m in runs}
        if len(values) > 1:
            notes.append(f"note: the runs differ in {key}: "
                         + ", ".join(f"{name}={m.get('protocol', {}).get(key)!r}" for name, m in runs))
    return "\n".join(rows + ([""] + notes if notes else []))
