"""``python -m eval``: ``refcoco`` (evaluate a checkpoint on one split) and ``compare`` (a table across runs).

    python -m eval refcoco --data-root DATA [--image-root IMAGES] --dataset refcoco --split-by unc --split val \\
        --model CKPT [--head stamp] [--batch-size 16] [--limit N] [--prompt TEMPLATE] --out DIR
    accelerate launch -m eval refcoco ...        # shards the samples over the processes
    python -m eval compare RUN_DIR [RUN_DIR ...]

Every user-facing failure (missing data root, malformed refs file, unknown split, not a checkpoint, head
mismatch, an output folder made with other settings) ends with one ``error: ...`` message, exit status 2,
no traceback. Rerunning the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

DATASETS = ("synthref", "refcoco", "refcoco+", "refcocog")
SPLITS = ("val", "testA", "testB", "test")
DEFAULT_SPLIT_BY = {"refcocog": "umd"}  # unc for the others


def _resolve(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def _load_segmenter(model: str, device: str | None) -> Any:
    from mmseg.predictor import Segmenter

    try:
        return Segmenter.from_pretrained(model, device=device)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - hub lookups and safetensors raise many types
        raise ValueError(f"cannot load checkpoint {model}: {type(err).__name__}: {err}") from None


def _process_state() -> Any:
    """``accelerate.PartialState``: one process, or this process's rank under ``accelerate launch`` (gloo on CPU)."""
    import torch

    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    # without cpu=True, accelerate ignores the launcher's WORLD_SIZE on a machine without GPUs
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.device.type == "cpu" and state.num_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    return state


def _cmd_refcoco(args: argparse.Namespace) -> None:
    from eval.layouts import open_dataset, validate_template
    from eval.report import markdown_report
    from eval.runner import run_eval

    prompt = validate_template(args.prompt)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    split_by = args.split_by or DEFAULT_SPLIT_BY.get(args.dataset, "unc")
    state = _process_state()
    main = state is None or state.is_main_process
    world = 1 if state is None else state.num_processes
    say = print if main else (lambda *a, **k: None)

    dataset, notes = open_dataset(args.layout, args.data_root, args.dataset, split_by, args.split, args.image_root)
    for note in notes:
        if main:
            print(f"warning: {note}", file=sys.stderr)
    device = args.device
    if device is None and state is not None:
        device = "cpu" if state.device.type == "cpu" else str(state.device)
    segmenter = _load_segmenter(args.model, device)
    head = getattr(segmenter, "head_name", None)
    if args.head is not None and head != args.head:
        raise ValueError(f"checkpoint {args.model} has head {head!r}, not {args.head!r} (--head); "
                         f"pass --head {head} or another checkpoint")
    layout = "parquet" if type(dataset).__name__ == "ParquetReferDataset" else "refer"
    image_root = getattr(dataset, "image_root", None)
    settings = {
        "model": _resolve(args.model), "head": head, "layout": layout, "data_root": _resolve(args.data_root),
        "image_root": None if image_root is None else _resolve(str(image_root)), "dataset": args.dataset,
        "split_by": split_by if layout == "refer" else "lmms-lab", "split": args.split,
        **({"notes": notes} if notes else {}),
    }
    n_all = len(dataset)
    n = min(n_all, args.limit) if args.limit else n_all
    say(f"eval: {args.dataset}({settings['split_by']}) {args.split}, layout {layout}, {n} sentences"
        + (f" (first {n} of {n_all}: --limit)" if args.limit else ""))
    say(f"model: {settings['model']} (head {head}), device {device or 'auto'}, {world} process(es), "
        f"batch size {args.batch_size}")
    say(f"prompt: \"{prompt}\"")
    say(f"out: {args.out}")

    import torch

    with torch.no_grad():
        metrics = run_eval(segmenter, dataset, args.out, settings=settings, prompt=prompt, batch_size=args.batch_size,
                           limit=args.limit, state=state, progress=not args.no_progress, log=say)
    if metrics is not None:
        print()
        print(markdown_report(metrics))
        timing = metrics["timing"]
        speed = timing["samples_per_s"]
        print(f"{timing['samples_this_run']} samples this run" + (f", {speed:.2f} samples/s" if speed else ""))
        out = Path(args.out)
        print(f"wrote {out / 'metrics.json'}, {out / 'predictions.jsonl'}, {out / 'report.md'}, {out / 'report.html'}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from eval.compare import compare_table

    print(compare_table(args.runs))


def build_parser() -> argparse.ArgumentParser:
    from mmseg.data.prompts import EVAL_TEMPLATE

    parser = argparse.ArgumentParser(prog="python -m eval", description="Referring-segmentation benchmark evaluator: "
                                     "refcoco (evaluate a checkpoint on one split), compare (one table across runs).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("refcoco", help="evaluate a checkpoint on one refCOCO-style split",
                       description="Referring segmentation: cIoU, gIoU, Prec@0.5-0.9, box Acc@0.5, no-target acc.")
    p.add_argument("--data-root", required=True, help="folder holding <dataset>/refs(<split_by>).p and instances.json "
                   "(or the lmms-lab parquet files)")
    p.add_argument("--image-root", default=None, help="folder with the images (default: searched under --data-root)")
    p.add_argument("--layout", choices=("auto", "refer", "parquet"), default="auto",
                   help="auto: parquet if .parquet files lie in --data-root, else REFER")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--split-by", choices=("unc", "umd", "google"), default=None,
                   help="refs partition (default: umd for refcocog, unc otherwise)")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--model", required=True, help="checkpoint folder (or hub id)")
    p.add_argument("--head", default=None, help="expected mask head; refuse a checkpoint with another one")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N sentences (quick look)")
    p.add_argument("--prompt", default=EVAL_TEMPLATE, help=f"prompt template (default: {EVAL_TEMPLATE!r})")
    p.add_argument("--device", default=None, help="default: the process's accelerator, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.set_defaults(func=_cmd_refcoco)

    p = sub.add_parser("compare", help="one table across run folders")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmseg.cli import run_command

    return run_command(build_parser(), argv, interrupted="interrupted: rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
