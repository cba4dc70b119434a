"""The latent-reasoning shaper against HiMTok alone, on SynthRef val and testB (the model writes its own answers).

    python benchmarks/shaper.py --model checkpoints/synthref-shaper --data data/synthref-s1 [--limit N]
                                [--himtok-model DIR] [--batch-size 1] [--precision bf16] [--json out.json]

Rows: the HiMTok checkpoint the shaper was trained from (``--himtok-model``, default the shaper's ``init_from``),
then the shaper with ``invoke`` = never / always / entropy / learned. Columns per split: cIoU and gIoU
(:mod:`mmseg.metrics` via :func:`mmseg.evaluation.evaluate_refer`); then invocations per mask and ms per query (the
predictor's ``total_ms``, averaged; with the default batch size 1 it is the latency of one query). "never" must
equal HiMTok: the shaper only adds work when it invokes.

Results are written only for a TRAINED shaper (a folder ``mmseg train --config tiny-shaper`` finished, with its
``train_summary.json``); anything else is a clear error, so no placeholder numbers reach the results folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.data.refer import ReferDataset  # noqa: E402
from mmseg.evaluation import evaluate_refer  # noqa: E402
from mmseg.modeling.builder import is_checkpoint  # noqa: E402
from mmseg.predictor import Segmenter  # noqa: E402

SPLITS = ("val", "testB")
MODES = ("never", "always", "entropy", "learned")
TRAIN_COMMAND = "mmseg train --config tiny-shaper --data DATA_ROOT --out {folder}"


class Recorder:
    """A segmenter that keeps every answer's mask infos and total time (for invocations and ms per query)."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self.infos: list[dict] = []
        self.total_ms: list[float] = []

    def batch(self, conversations, images, **options):
        answers = self.segmenter.batch(conversations, images, **options)
        for answer in answers:
            self.infos.extend(answer.info)
            self.total_ms.append(answer.timings["total_ms"])
        return answers


def check_trained_shaper(folder: Path) -> None:
    """A clear error unless ``folder`` is a shaper checkpoint whose training finished."""
    if not is_checkpoint(folder):
        raise SystemExit(f"error: no shaper checkpoint at {folder}; train one with `{TRAIN_COMMAND.format(folder=folder)}` "
                         "(results are only written for a trained shaper)")
    head = json.loads((folder / "config.json").read_text())["model"]["head"]
    if head.get("name") != "shaper":
        raise SystemExit(f"error: {folder} is a {head.get('name')!r} model, not a shaper")
    if not (folder / "train_summary.json").is_file():
        raise SystemExit(f"error: {folder} has no train_summary.json: its shaper training has not finished (re-run "
                         f"`{TRAIN_COMMAND.format(folder=folder)}` to resume it)")


def evaluate(recorder: Recorder, dataset: ReferDataset, indices: list[int], batch_size: int, autocast,
             **options) -> dict:
    recorder.infos, recorder.total_ms = [], []
    start = time.perf_counter()
    with autocast():
        result = evaluate_refer(recorder, dataset, indices, batch_size=batch_size, progress=True, **options)
    masks = max(1, len(recorder.infos))
    return {"ciou": result["ciou"], "giou": result["giou"], "n": result["n"],
            "invocations_per_mask": sum(i.get("invocations", 0) for i in recorder.infos) / masks,
            "masks": len(recorder.infos),
            "ms_per_query": sum(recorder.total_ms) / max(1, len(recorder.total_ms)),
            "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()  # scoped: importing and calling main() leaves autograd as it was
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/synthref-shaper", help="a trained shaper checkpoint")
    parser.add_argument("--himtok-model", default=None, help="HiMTok checkpoint (default: the shaper's init_from)")
    parser.add_argument("--data", required=True, help="SynthRef root (use a seed the models were not trained on)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate every k-th sample so that at most N remain")
    parser.add_argument("--batch-size", type=int, default=1, help="1 = ms per query is single-query latency")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default="benchmarks/results/shaper.json")
    args = parser.parse_args(argv)

    folder = Path(args.model)
    check_trained_shaper(folder)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shaper = Segmenter.from_pretrained(folder, device=device)
    himtok_folder = Path(args.himtok_model or shaper.model.head.options().get("init_from") or "")
    if not is_checkpoint(himtok_folder):
        raise SystemExit(f"error: no HiMTok checkpoint at {himtok_folder!s} (the shaper's init_from); pass --himtok-model")
    himtok = Segmenter.from_pretrained(himtok_folder, device=device)
    if himtok.head_name != "himtok":
        raise SystemExit(f"error: {himtok_folder} is a {himtok.head_name!r} model, not a HiMTok one")

    def autocast():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    runs = [("himtok", himtok, {})] + [(f"shaper {mode}", shaper, {"invoke": mode}) for mode in MODES]
    results: dict = {"model": str(folder), "himtok_model": str(himtok_folder), "data": args.data, "limit": args.limit,
                     "batch_size": args.batch_size, "precision": args.precision, "device": device,
                     "threads": torch.get_num_threads(), "runs": {}}
    for split in SPLITS:
        dataset = ReferDataset(args.data, "synthref", "unc", split)
        step = max(1, len(dataset) // args.limit) if args.limit else 1
        indices = list(range(0, len(dataset), step))[: args.limit]
        for name, segmenter, options in runs:
            result = evaluate(Recorder(segmenter), dataset, indices, args.batch_size, autocast, **options)
            results["runs"].setdefault(name, {})[split] = result

    header = "".join(f"{s + ' cIoU':>12}{s + ' gIoU':>12}" for s in SPLITS)
    print(f"{'run':<18}{header}{'calls/mask':>12}{'ms/query':>10}")
    for name, per_split in results["runs"].items():  # the last two columns pool both splits
        cells = "".join(f"{per_split[s]['ciou']:>12.4f}{per_split[s]['giou']:>12.4f}" for s in SPLITS)
        masks = sum(per_split[s]["masks"] for s in SPLITS)
        calls = sum(per_split[s]["invocations_per_mask"] * per_split[s]["masks"] for s in SPLITS) / max(1, masks)
        queries = sum(per_split[s]["n"] for s in SPLITS)
        ms = sum(per_split[s]["ms_per_query"] * per_split[s]["n"] for s in SPLITS) / max(1, queries)
        print(f"{name:<18}{cells}{calls:>12.2f}{ms:>10.1f}")
        per_split["all"] = {"invocations_per_mask": round(calls, 4), "ms_per_query": round(ms, 2)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"-> {args.json}")
    return results


if __name__ == "__main__":
    main()
