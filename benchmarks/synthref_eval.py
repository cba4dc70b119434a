"""Quality of a checkpoint on SynthRef splits, with the model writing its own answers (never teacher-forced).

    python benchmarks/synthref_eval.py --model checkpoints/synthref-stamp --data data/synthref-s1 [--limit N]

Prints cIoU / gIoU / no-target accuracy per split (and cIoU per expression type) plus exact match on the
understanding questions, and writes JSON. Use data generated with a seed the model was not trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.data.refer import ReferDataset, read_qa  # noqa: E402
from mmseg.evaluation import evaluate_qa, evaluate_refer  # noqa: E402
from mmseg.predictor import Segmenter  # noqa: E402


@torch.no_grad()  # scoped: importing and calling main() leaves autograd as it was
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/synthref-stamp")
    parser.add_argument("--data", required=True)
    parser.add_argument("--splits", nargs="+", default=["val", "testA", "testB"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate every k-th sample so that at most N remain")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep-tokens", type=int, nargs="*", default=[],
                        help="coarse-to-fine heads: also score each split with only the first k mask tokens")
    parser.add_argument("--no-refine-mask", action="store_true",
                        help="heads with a mask refiner (HiMTok refine_channels): score the tokenizer's own decodes")
    parser.add_argument("--json", default="benchmarks/results/synthref_eval.json")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (figures may differ in the last digits: other kernels)")
    args = parser.parse_args(argv)

    seg = Segmenter.from_pretrained(args.model, device=args.device)
    options = {}
    if args.no_refine_mask:
        if "refine_mask" not in seg.head_options:
            parser.error(f"--no-refine-mask: the {seg.head_name} head of {args.model} has no mask refiner")
        options["refine_mask"] = False
    results: dict = {"model": args.model, "data": args.data, "head": seg.head_name, "options": options}
    for split in args.splits:
        ds = ReferDataset(args.data, "synthref", "unc", split)
        step = max(1, len(ds) // args.limit) if args.limit else 1
        indices = list(range(0, len(ds), step))[: args.limit]
        start = time.perf_counter()
        with torch.autocast(seg.model.device.type, dtype=torch.bfloat16):
            results[split] = evaluate_refer(seg, ds, indices, batch_size=args.batch_size, progress=True, **options)
        results[split]["seconds"] = round(time.perf_counter() - start, 1)
        for k in args.keep_tokens:
            with torch.autocast(seg.model.device.type, dtype=torch.bfloat16):
                r = evaluate_refer(seg, ds, indices, batch_size=args.batch_size, keep_tokens=k, **options)
            results[split].setdefault("keep_tokens", {})[k] = {m: r[m] for m in ("ciou", "giou", "prec@0.5")}
    qa = read_qa(args.data, "val")
    if args.limit:
        qa = qa[: args.limit]
    with torch.autocast(seg.model.device.type, dtype=torch.bfloat16):
        results["qa"] = evaluate_qa(seg, qa, Path(args.data) / "images", batch_size=args.batch_size)

    print(f"{'split':<8}{'n':>6}{'cIoU':>8}{'gIoU':>8}{'P@0.5':>8}{'no-tgt':>8}{'named':>8}   cIoU by type")
    for split in args.splits:
        r = results[split]
        types = ", ".join(f"{k} {v['ciou']:.3f} ({v['n']})" for k, v in r["by_type"].items())
        nt = "-" if r["no_target_acc"] is None else f"{r['no_target_acc']:.3f}"
        named = "-" if r.get("named") is None else f"{r['named']:.3f}"
        print(f"{split:<8}{r['n']:>6}{r['ciou']:>8.3f}{r['giou']:>8.3f}{r['prec@0.5']:>8.3f}{nt:>8}{named:>8}   {types}")
        for k, kr in r.get("keep_tokens", {}).items():
            print(f"{'  k=' + str(k):<8}{'':>6}{kr['ciou']:>8.3f}{kr['giou']:>8.3f}{kr['prec@0.5']:>8.3f}")
    print(f"QA exact match {results['qa']['qa_exact_match']:.3f} over {results['qa']['qa_n']} questions")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
