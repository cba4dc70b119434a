"""Where a model finds the referent, per expression type: its grounding gate against the referent's cells.

    python benchmarks/grounding.py --model checkpoints/synthref-himtok --data data/synthref-s1 [--split val]
                                   [--limit 300] [--json out.json]

For a model with a grounding gate (``ground_layer``), a teacher-forced pass over each sentence of the split (the
target answer; with the image after the request its positions see the request but not the answer) reads the gate's
logits after LM layer ``ground_layer`` and compares them with the referent's cells (:func:`focus_cells`, the
gate's own training target): the share of sentences whose top-scoring cell lies on the referent and the mean IoU of
the cells it marks (logit > 0). Why: it tells a grounding failure (the backbone does not find the object) from an
emission failure (it finds it, the head draws it badly): on ``synthref-himtok`` the cell IoU per type followed the
mask cIoU per type (session 17). Sentences without a target are skipped. Models with different ``image_merge``
have different grids, so compare figures across models with care.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.data.collate import Collator, ExamplePool  # noqa: E402
from mmseg.data.refer import ReferDataset  # noqa: E402
from mmseg.modeling.builder import load_pretrained  # noqa: E402
from mmseg.modeling.grounding import focus_cells  # noqa: E402


@torch.no_grad()
def grounding_by_type(model, processor, data: Path, split: str = "val", limit: int | None = None,
                      batch_size: int = 16) -> dict[str, dict[str, float]]:
    """``{expression type: {"n", "top_cell_hit", "cell_iou"}}`` over every k-th sentence of ``split`` (at most
    ``limit``) that has a target."""
    if model.grounder is None:
        raise SystemExit("error: this model has no grounding gate (its preset sets no ground_layer); nothing to read")
    model.eval()
    refer = ReferDataset(data, "synthref", "unc", split)
    pool = ExamplePool(refer, [], refer.image_root, describe_targets=True, with_objects=model.probe is not None)
    collate = Collator(processor, model.head, patch_labels=model.probe.families if model.probe else None,
                       size_bins=model.config.patch_size_bins, focus=True)
    indices = list(range(len(refer)))
    if limit is not None:
        indices = indices[:: max(1, len(indices) // limit)][:limit]
    indices = [i for i in indices if refer[i].has_target]
    rng = random.Random(0)  # the prompt template per sentence
    tally: dict[str, list[float]] = {}
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batch = collate([pool.segmentation(i, rng) for i in chunk])
        model({k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()})
        logits = model.grounder.last_logits.float().cpu()  # (B, gh, gw)
        cells = focus_cells(batch["focus_targets"], tuple(logits.shape[-2:])) > 0
        for row, index in enumerate(chunk):
            if not cells[row].any():
                continue
            marked = logits[row] > 0
            hit = float(cells[row].flatten()[int(logits[row].flatten().argmax())])
            iou = float((marked & cells[row]).sum()) / max(1.0, float((marked | cells[row]).sum()))
            entry = tally.setdefault(str(refer.ref_of(index).get("expr_type") or "unknown"), [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += hit
            entry[2] += iou
    return {kind: {"n": int(n), "top_cell_hit": hit / n, "cell_iou": iou / n}
            for kind, (n, hit, iou) in sorted(tally.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a checkpoint with a grounding gate")
    parser.add_argument("--data", required=True, help="SynthRef root (use a seed the model was not trained on)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=300, help="every k-th sentence so that at most N remain")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    model, processor = load_pretrained(args.model)
    results = grounding_by_type(model, processor, Path(args.data), args.split, args.limit)
    print(f"{'type':12s} {'n':>5s} {'top-cell hit':>13s} {'cell IoU':>9s}")
    for kind, row in results.items():
        print(f"{kind:12s} {row['n']:5d} {row['top_cell_hit']:13.3f} {row['cell_iou']:9.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "data": args.data, "split": args.split,
                                               "limit": args.limit, "by_type": results}, indent=2))
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
