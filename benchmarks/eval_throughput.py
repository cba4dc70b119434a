"""Throughput of the refCOCO evaluator (``python -m eval refcoco``) on SynthRef val at batch size 1 and 16.

    python benchmarks/eval_throughput.py --model checkpoints/synthref-stamp --data data/synthref-s1 [--n 64]

Runs the evaluator's own loop (inference, RLE encoding, scoring, streaming with fsync) on the first N
sentences of SynthRef val into a temporary folder per batch size, prints samples per second as a table, checks
that every batch size gives the same masks, and writes JSON (default benchmarks/results/eval_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eval.runner import PREDICTIONS_FILE, read_lines, run_eval  # noqa: E402
from mmseg.data.refer import ReferDataset  # noqa: E402
from mmseg.predictor import Segmenter  # noqa: E402


def measure(seg: Segmenter, ds: ReferDataset, n: int, batch_size: int) -> tuple[dict, list]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = run_eval(seg, ds, tmp, limit=n, batch_size=batch_size, report=False, log=lambda s: None)
        seconds = time.perf_counter() - start
        masks = [(line["idx"], line["rle"]["counts"]) for line, _ in read_lines(Path(tmp) / PREDICTIONS_FILE)[0]]
    assert metrics is not None
    row = {"batch_size": batch_size, "n": metrics["n"], "seconds": round(seconds, 3),
           "samples_per_s": round(metrics["n"] / seconds, 3), "ms_per_sample": round(1000 * seconds / metrics["n"], 2),
           "ciou": metrics["ciou"], "failures": metrics["failures"]}
    return row, masks


@torch.no_grad()  # scoped: importing and calling main() leaves autograd as it was
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/synthref-stamp")
    parser.add_argument("--data", required=True, help="SynthRef root (holding synthref/ and images/)")
    parser.add_argument("--n", type=int, default=64, help="sentences of val to run (the first N)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default="benchmarks/results/eval_throughput.json")
    args = parser.parse_args(argv)

    seg = Segmenter.from_pretrained(args.model, device=args.device)
    ds = ReferDataset(args.data, "synthref", "unc", "val")
    n = min(args.n, len(ds))
    warm = [ds[i] for i in range(min(2, n))]  # first-call costs (allocator, lazy init) stay out of the numbers
    seg.batch([[{"role": "user", "content": s.sentence}] for s in warm], [s.image_path for s in warm])

    rows, reference = [], None
    identical = True
    for bs in args.batch_sizes:
        row, masks = measure(seg, ds, n, bs)
        rows.append(row)
        reference = masks if reference is None else reference
        identical &= masks == reference
    base = rows[0]["samples_per_s"]
    print(f"evaluator throughput, SynthRef val, first {n} sentences, model {args.model} (head {seg.head_name}), "
          f"device {seg.model.device}, {torch.get_num_threads()} threads")
    print("| batch size | samples | seconds | samples/s | ms/sample | speed-up | cIoU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['n']} | {r['seconds']:.2f} | {r['samples_per_s']:.2f} | "
              f"{r['ms_per_sample']:.1f} | {r['samples_per_s'] / base:.2f}x | {100 * r['ciou']:.2f} |")
    print(f"masks identical across batch sizes: {'yes' if identical else 'NO'}")
    if len(rows) > 1 and rows[-1]["samples_per_s"] <= base:
        print("note: batching did not help on this machine")
    result = {"model": args.model, "head": seg.head_name, "data": args.data, "n": n, "device": str(seg.model.device),
              "threads": torch.get_num_threads(), "machine": platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__, "masks_identical": identical, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
