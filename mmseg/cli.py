"""The ``mmseg`` command: ``synth``, ``train``, ``train-tokenizer``, ``predict``.

Every user-facing failure (missing file, corrupt image, unknown preset or head, not a checkpoint) ends with
one ``error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_synth(args: argparse.Namespace) -> None:
    from mmseg.data.synthetic import write_synthref

    counts = write_synthref(args.out, seed=args.seed, n_train=args.train, n_val=args.val, n_test=args.test,
                            image_size=args.image_size)
    print(json.dumps(counts, indent=2))


def _cmd_train(args: argparse.Namespace) -> None:
    from mmseg.config import load_preset
    from mmseg.train import train

    preset = load_preset(args.config, args.set)
    summary = train(preset, args.data, args.out, max_minutes=args.max_minutes, max_steps=args.max_steps, init=args.init)
    print(json.dumps(summary, indent=2))


def _cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from mmseg.train_tokenizer import train_tokenizer

    config = None
    if args.set or args.init is None:
        from mmseg.modeling.mask_tokenizer import MaskTokenizer, MaskTokenizerConfig

        base = MaskTokenizer.from_pretrained(args.init).config if args.init else MaskTokenizerConfig()
        config = base.with_overrides(args.set)
    summary = train_tokenizer(args.data, args.out, config, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, max_minutes=args.max_minutes, device=args.device, num_workers=args.workers,
                              init=args.init, train_part=args.train_part, mixed_precision=args.mixed_precision,
                              val_data=args.val, val_masks=args.val_masks, eval_every=args.eval_every,
                              procedural_fraction=args.procedural_fraction, loss_at_frame=args.loss_at_frame)
    print(json.dumps(summary, indent=2))


def _cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np

    from mmseg.masks import encode_rle, save_mask_png
    from mmseg.predictor import Segmenter

    if not args.query.strip():
        raise ValueError("the query is empty: pass --query 'the red circle' or a question")
    segmenter = Segmenter.from_pretrained(args.model, device=args.device)
    options = {"keep_tokens": args.keep_tokens} if args.keep_tokens else {}
    if args.invoke:
        options["invoke"] = args.invoke
    answer = segmenter(args.image, args.query, **options)
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    from mmseg.imageio import load_image

    width, height = load_image(args.image).size
    union = np.zeros((height, width), dtype=bool)
    for mask in answer.masks:
        union |= mask
    save_mask_png(union, f"{prefix}_mask.png")
    record = {"query": args.query, "text": answer.text, "masks": [encode_rle(m) for m in answer.masks],
              "boxes": answer.boxes, "timings": answer.timings, "info": answer.info, "notes": answer.notes}
    Path(f"{prefix}_masks.json").write_text(json.dumps(record, indent=2))
    print(f"answer: {answer.text}")
    print(f"masks: {len(answer.masks)} ({int(union.sum())} pixels) -> {prefix}_mask.png, {prefix}_masks.json")
    print("timings (ms): " + ", ".join(f"{k}={v:.1f}" for k, v in answer.timings.items()))


def build_parser() -> argparse.ArgumentParser:
    from mmseg.config import list_presets

    parser = argparse.ArgumentParser(prog="mmseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write SynthRef data in the refCOCO (REFER) layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=4000, help="training images")
    p.add_argument("--val", type=int, default=300, help="validation images")
    p.add_argument("--test", type=int, default=300, help="images for testA and again for testB")
    p.add_argument("--image-size", type=int, default=128)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a model from a preset")
    p.add_argument("--config", required=True, help=f"preset name ({', '.join(list_presets())}) or a .json file")
    p.add_argument("--data", required=True, help="data root holding synthref/ and images/")
    p.add_argument("--out", required=True, help="checkpoint folder (re-run to resume)")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights and tokenizer (fine-tuning; ignored when resuming)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset value, e.g. --set train.batch_size=64 --set train.num_workers=8 (repeatable)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("train-tokenizer", help="train the HiMT mask tokenizer on COCO-format masks + procedural shapes")
    p.add_argument("--data", required=True, nargs="+", help="folders holding */instances.json (or the files)")
    p.add_argument("--out", required=True, help="tokenizer folder (re-run to resume)")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine to 0.1x)")
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--workers", type=int, default=0, help="loader processes drawing masks ahead of the step")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="tokenizer config field, e.g. pixel_decoder=residual (repeatable)")
    p.add_argument("--init", default=None, help="start from this tokenizer folder (ignored when resuming)")
    p.add_argument("--train-part", choices=["all", "decoder"], default="all",
                   help="decoder: freeze the encoder and codebook (codes unchanged; needs --init)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                   help="bf16: autocast the encoder and decoder (faster on CPUs with bf16 matmuls and on GPUs)")
    p.add_argument("--val", nargs="+", default=None,
                   help="held-out annotations (folders or instances.json files, e.g. another SynthRef seed): "
                        "round-trip IoU logged every --eval-every steps")
    p.add_argument("--val-masks", type=int, default=256, help="how many held-out masks to round-trip")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--procedural-fraction", type=float, default=0.4,
                   help="share of training masks drawn from procedural shapes rather than the annotations")
    p.add_argument("--loss-at-frame", action="store_true",
                   help="score the logits resampled to the masks' own frame (the benchmark's) instead of "
                        "coverage at mask_size")
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser("predict", help="answer a query about an image and write its mask")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--image", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--out", required=True, help="output prefix: PREFIX_mask.png and PREFIX_masks.json")
    p.add_argument("--device", default=None)
    p.add_argument("--keep-tokens", type=int, default=None, help="HiMTok: decode from the first k mask tokens")
    p.add_argument("--invoke", default=None, help="shaper: never, always, entropy or learned (default: its config)")
    p.set_defaults(func=_cmd_predict)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None, interrupted: str = "interrupted") -> int:
    """Parse ``argv`` and run the chosen sub-command: user errors become one ``error: ...`` line and exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
