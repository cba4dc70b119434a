"""Human-readable outputs of a run: ``report.md`` (our numbers, and beside the peers' reported cIoU for real
refCOCO / refCOCO+ / refCOCOg) and ``report.html`` (best and worst samples as overlays, PNGs inlined)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mmseg.masks import decode_rle, overlay

from eval.layouts import PARQUET_VAL_WARNING

__all__ = ["PEERS", "PEER_SPLITS", "STANDARD_SPLIT_BY", "html_report", "markdown_report", "metrics_table",
           "peers_table", "write_reports"]

# Reported cIoU (%) from /shared/design/EVAL.md; None = not reported.
PEER_SPLITS: dict[str, tuple[str, ...]] = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
}
STANDARD_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
PEERS: dict[str, dict[str, dict[str, float]]] = {
    "refcoco": {
        "LISA-7B": {"val": 74.1, "testA": 76.5, "testB": 71.1},
        "GLaMM": {"val": 79.5, "testA": 83.2, "testB": 76.9},
        "Text4Seg (InternVL2-8B, +SAM)": {"val": 79.2, "testA": 81.7, "testB": 75.6},
        "HiMTok-8B fine-tuned": {"val": 85.0},
    },
    "refcoco+": {
        "LISA-7B": {"val": 62.4, "testA": 67.4, "testB": 56.5},
        "GLaMM": {"val": 72.6, "testA": 78.7, "testB": 64.6},
        "Text4Seg (InternVL2-8B, +SAM)": {"val": 72.8, "testA": 77.9, "testB": 66.5},
        "HiMTok-8B fine-tuned": {"val": 79.7},
    },
    "refcocog": {
        "LISA-7B": {"val": 66.4, "test": 68.5},
        "GLaMM": {"val": 74.2, "test": 74.9},
        "Text4Seg (InternVL2-8B, +SAM)": {"val": 74.0, "test": 75.3},
        "HiMTok-8B fine-tuned": {"val": 80.0},
    },
}
_ROWS = (("cIoU", "ciou"), ("gIoU", "giou"), ("Prec@0.5", "prec@0.5"), ("Prec@0.6", "prec@0.6"),
         ("Prec@0.7", "prec@0.7"), ("Prec@0.8", "prec@0.8"), ("Prec@0.9", "prec@0.9"), ("box Acc@0.5", "box_acc@0.5"),
         ("no-target acc", "no_target_acc"))
N_SHOWN = 8
GT_SLOT, PRED_SLOT = 1, 7  # mmseg.masks palette: cyan ground truth, pink prediction (SynthRef has red/green shapes)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def protocol_lines(metrics: dict[str, Any]) -> list[str]:
    p = metrics.get("protocol", {})
    limit = p.get("limit")
    subset = f", first {p.get('n')} of {p.get('n_split')} (--limit {limit})" if limit is not None else ""
    return [
        f"dataset {p.get('dataset')} ({p.get('split_by')}) split {p.get('split')}, layout {p.get('layout')}, "
        f"n = {metrics.get('n')} sentences{subset}, failures {metrics.get('failures')}",
        f"model {p.get('model')} (head {p.get('head')})",
        f"prompt \"{p.get('prompt')}\", masks at the original image size, ground truth > 0",
    ]


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = ["| metric | value (%) |", "|---|---|"]
    rows += [f"| {label} | {pct(metrics.get(key))} |" for label, key in _ROWS]
    rows.append(f"| samples (no-target) | {metrics.get('n')} ({metrics.get('n_no_target')}) |")
    rows.append(f"| failures | {metrics.get('failures')} |")
    return "\n".join(rows)


def caveats(metrics: dict[str, Any]) -> list[str]:
    """Why our number may not be comparable with the peers' (empty if it is)."""
    p = metrics.get("protocol", {})
    dataset, split = p.get("dataset"), p.get("split")
    out = []
    if p.get("layout") == "parquet":
        out.append(PARQUET_VAL_WARNING if split == "val" else "evaluated on the lmms-lab parquet copy, not the REFER files")
    if dataset in STANDARD_SPLIT_BY and p.get("split_by") != STANDARD_SPLIT_BY[dataset] and p.get("layout") != "parquet":
        out.append(f"split_by {p.get('split_by')}: the peers report {dataset}({STANDARD_SPLIT_BY[dataset]})")
    if p.get("limit") is not None and (p.get("n") or 0) < (p.get("n_split") or 0):
        out.append(f"a subset: the first {p.get('n')} of {p.get('n_split')} sentences (--limit)")
    return out


def peers_table(metrics: dict[str, Any]) -> str | None:
    """cIoU (%) of the peers beside ours for refcoco / refcoco+ / refcocog; None for other datasets or splits."""
    p = metrics.get("protocol", {})
    dataset, split = p.get("dataset"), p.get("split")
    if dataset not in PEERS or split not in PEER_SPLITS[dataset]:
        return None
    cols = PEER_SPLITS[dataset]
    rows = [f"| model ({dataset} cIoU) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, scores in PEERS[dataset].items():
        rows.append(f"| {name} | " + " | ".join(f"{scores[c]:.1f}" if c in scores else "-" for c in cols) + " |")
    ours = [pct(metrics.get("ciou")) if c == split else "-" for c in cols]
    rows.append(f"| **ours** ({p.get('head')}, {Path(str(p.get('model'))).name}) | " + " | ".join(ours) + " |")
    return "\n".join(rows)


def markdown_report(metrics: dict[str, Any]) -> str:
    p = metrics.get("protocol", {})
    parts = [f"# {p.get('dataset')} {p.get('split')}: referring segmentation", "",
             *(f"- {line}" for line in protocol_lines(metrics)), "", metrics_table(metrics), ""]
    table = peers_table(metrics)
    if table is not None:
        parts += ["## Beside the peers' reported cIoU", "", table, ""]
        parts += [f"> note: {c}" for c in caveats(metrics)]
        if caveats(metrics):
            parts.append("")
    elif p.get("dataset") in PEERS:
        parts += [f"(the peers report {p.get('dataset')} only on {', '.join(PEER_SPLITS[p['dataset']])})", ""]
    if metrics.get("failed_samples"):
        parts += ["## Failed samples (counted as empty masks)", ""]
        parts += [f"- #{f['idx']} ref {f['ref_id']} sent {f['sent_id']}: {f['reason']}" for f in metrics["failed_samples"][:50]]
        if len(metrics["failed_samples"]) > 50:
            parts.append(f"- ... and {len(metrics['failed_samples']) - 50} more (metrics.json lists all)")
        parts.append("")
    return "\n".join(parts)


# -- HTML --------------------------------------------------------------------------------------------------
def _iou(line: dict[str, Any]) -> float:
    return line["intersection"] / line["union"] if line["union"] > 0 else 1.0


def _png(image: Image.Image, side: int = 256) -> str:
    """Inline PNG with the longer side scaled to ``side`` (small images are enlarged, pixels kept sharp)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    im = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _paint(image: Image.Image, mask: np.ndarray, slot: int) -> Image.Image:
    """``overlay`` in the colour of palette slot ``slot`` (earlier slots get empty masks)."""
    empty = np.zeros(mask.shape, dtype=bool)
    return overlay(image, [empty] * slot + [mask], alpha=0.55)


def _panels(dataset: Any, line: dict[str, Any]) -> tuple[list[str], str]:
    pred = decode_rle(line["rle"])
    note = ""
    try:
        sample = dataset[line["idx"]]
        gt = np.asarray(sample.mask) > 0
        try:
            image = _open(sample.image_path)
            if image.size != (gt.shape[1], gt.shape[0]):
                raise ValueError(f"image is {image.size[0]}x{image.size[1]}, annotations say {gt.shape[1]}x{gt.shape[0]}")
        except Exception as err:  # noqa: BLE001 - a failed sample's image may be unreadable: show grey
            image, note = Image.new("RGB", (gt.shape[1], gt.shape[0]), (128, 128, 128)), f"image unreadable: {err}"
        pics = [image, _paint(image, gt, GT_SLOT), _paint(image, pred, PRED_SLOT) if pred.shape == gt.shape else image]
    except Exception as err:  # noqa: BLE001 - the report must not fail the run
        blank = Image.new("RGB", (pred.shape[1], pred.shape[0]), (128, 128, 128))
        pics, note = [blank, blank, _paint(blank, pred, PRED_SLOT)], f"sample unavailable: {err}"
    return [_png(p) for p in pics], note


def html_report(metrics: dict[str, Any], lines: Sequence[dict[str, Any]], dataset: Any, n_shown: int = N_SHOWN) -> str:
    """One page: protocol, metrics, and the ``n_shown`` best and worst samples by IoU (ties: sample order)."""
    ranked = sorted(lines, key=lambda ln: (-_iou(ln), ln["idx"]))
    worst = sorted(lines, key=lambda ln: (_iou(ln), ln["idx"]))[:n_shown]
    p = metrics.get("protocol", {})
    esc = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(str(p.get('dataset')))} {esc(str(p.get('split')))}: evaluation</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{display:block;max-width:256px}"
        ".fail{color:#b00}</style></head><body>",
        f"<h1>{esc(str(p.get('dataset')))} {esc(str(p.get('split')))}</h1><ul>",
        *(f"<li>{esc(line)}</li>" for line in protocol_lines(metrics)), "</ul><table><tr>",
        *(f"<th>{esc(label)}</th>" for label, _ in _ROWS), "</tr><tr>",
        *(f"<td>{pct(metrics.get(key))}</td>" for _, key in _ROWS), "</tr></table>",
    ]
    for title, chosen in ((f"Best {n_shown} by IoU", ranked[:n_shown]), (f"Worst {n_shown} by IoU", worst)):
        out.append(f"<h2>{esc(title)}</h2><table><tr><th>sample</th><th>image</th><th>ground truth</th>"
                   "<th>prediction</th></tr>")
        for line in chosen:
            pics, note = _panels(dataset, line)
            fail = f"<div class='fail'>failed: {esc(str(line.get('reason')))}</div>" if line["failed"] else ""
            extra = f"<div class='fail'>{esc(note)}</div>" if note else ""
            out.append(
                f"<tr><td>#{line['idx']} (ref {line['ref_id']}, sent {line['sent_id']})<br>"
                f"<b>{esc(str(line['sentence']))}</b><br>IoU {_iou(line):.3f}<br>"
                f"answer: <i>{esc(str(line.get('text', '')))}</i>{fail}{extra}</td>"
                + "".join(f"<td><img src='{src}'></td>" for src in pics) + "</tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def write_reports(out_dir: Path, metrics: dict[str, Any], lines: Sequence[dict[str, Any]], dataset: Any) -> None:
    (Path(out_dir) / "report.md").write_text(markdown_report(metrics), encoding="utf-8")
    (Path(out_dir) / "report.html").write_text(html_report(metrics, lines, dataset), encoding="utf-8")
