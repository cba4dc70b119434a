"""Round-trip quality and speed of a HiMT mask tokenizer on held-out masks.

    python benchmarks/tokenizer.py --tokenizer checkpoints/synthref-himtok/mask_tokenizer --data data/synthref-s1 \
        [--n 500] [--refine 0 4]

Prints mean IoU of encode -> decode(keep=k) for k = 1, 2, 4, 8, 16, 32, codebook usage (share of codes used,
perplexity), encode/decode milliseconds, and the round trip of a shape unlike any training mask (scikit-image's
horse silhouette, when scikit-image is installed). Writes JSON.

IoU is measured in the masks' own frame (the image letterboxed to a square of its longer side, 128 px for
SynthRef), which is what a segmentation model is scored at: a tokenizer that works at a coarser ``mask_size``
pays for its resampling here. ``--frame N`` picks another square instead. The IoU at the tokenizer's own
``mask_size`` (masks area-downsampled, logits thresholded there) is reported too, to separate resampling loss
from coding loss; so is the IoU over the smallest third of the masks, where every boundary pixel counts.
``--refine C ...``: encode with decode-aware code choice over C candidates per token (0: nearest codes; default:
the tokenizer's own ``refine_candidates``); with several values, each gets its table, and the JSON keeps the first
at the top level and the others under ``"refine"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.modeling.mask_tokenizer import MaskTokenizer  # noqa: E402
from mmseg.train_tokenizer import letterbox_mask, load_masks, mask_iou  # noqa: E402


@torch.no_grad()
def evaluate(tok: MaskTokenizer, masks: np.ndarray, ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
             batch: int = 64, kinds: list[str] | None = None, refine: int | None = None) -> dict:
    """Round trip of square bool masks ``(N, S, S)`` through ``tok``: mean IoU per prefix length
    at ``S`` and at ``mask_size``, small-mask IoU, code usage and timings; with ``kinds`` (one name per mask), the
    full-length IoU per kind. ``refine``: passed to ``encode``."""
    tok = tok.eval()
    s, ms = masks[0].shape[-1], tok.config.mask_size
    ks = tuple(sorted(k for k in ks if k <= tok.config.num_tokens))
    stack = torch.from_numpy(np.asarray(masks, dtype=bool))
    areas = stack.flatten(1).float().mean(1)
    small = areas <= areas.quantile(1 / 3)  # (N,) the smallest third
    start = time.perf_counter()
    ids = torch.cat([tok.encode(stack[i : i + batch], refine=refine) for i in range(0, len(masks), batch)])
    encode_ms = (time.perf_counter() - start) * 1000 / len(masks)
    # Targets at the tokenizer's own resolution: area fraction > 0.5.
    native = F.interpolate(stack[:, None].float(), size=(ms, ms), mode="area")[:, 0] > 0.5 if s != ms else stack
    results = {}
    for k in ks:
        start = time.perf_counter()
        logits = torch.cat([tok.decode(ids[i : i + batch], keep=k, size=(s, s)) for i in range(0, len(ids), batch)])
        decode_ms = (time.perf_counter() - start) * 1000 / len(masks)
        own = torch.cat([tok.decode(ids[i : i + batch], keep=k) for i in range(0, len(ids), batch)])
        per = mask_iou(logits > 0, stack)
        results[k] = {"iou": float(per.mean()), "iou_small": float(per[small].mean()),
                      "iou_at_mask_size": float(mask_iou(own > 0, native).mean()),
                      "decode_ms": decode_ms}
    counts = torch.bincount(ids.flatten(), minlength=tok.config.codebook_size).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    used = tok.config.refine_candidates if refine is None else refine
    out = {"n_masks": len(masks), "frame": s, "refine_candidates": used, "mask_size": ms, "round_trip": results,
           "encode_ms": encode_ms,
           "codes_used_share": float((counts > 0).float().mean()), "code_perplexity": perplexity}
    if kinds is not None:  # ``per`` holds the last, longest prefix's IoUs (``ks`` ascends)
        out["iou_by_kind"] = {name: float(per[torch.tensor([n == name for n in kinds])].mean())
                              for name in sorted(set(kinds))}
    try:
        from skimage import data as skdata

        horse = ~skdata.horse().astype(bool)  # the silhouette is dark on white
        frame = torch.from_numpy(letterbox_mask(horse, s))[None]
        out["horse_iou"] = float(mask_iou(tok.decode(tok.encode(frame, refine=refine), size=(s, s)) > 0, frame)[0])
    except ImportError:
        out["horse_iou"] = None
    return out


def report(out: dict) -> str:
    lines = [f"{'k':>4}{'IoU':>8}{'small':>8}{'@' + str(out['mask_size']):>8}{'decode ms':>11}"]
    for k, r in out["round_trip"].items():
        lines.append(f"{k:>4}{r['iou']:>8.3f}{r['iou_small']:>8.3f}{r['iou_at_mask_size']:>8.3f}{r['decode_ms']:>11.2f}")
    if out.get("iou_by_kind"):
        lines.append("by kind (all tokens): " + ", ".join(f"{n} {v:.3f}" for n, v in out["iou_by_kind"].items()))
    horse = out["horse_iou"]
    lines.append(f"codes: {'nearest' if out['refine_candidates'] < 2 else 'refined over ' + str(out['refine_candidates'])}"
                 f"; frame {out['frame']} px; encode {out['encode_ms']:.2f} ms/mask; codes used {out['codes_used_share']:.1%}; "
                 f"perplexity {out['code_perplexity']:.0f}; horse silhouette IoU {horse if horse is None else round(horse, 3)}")
    return "\n".join(lines)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="SynthRef root of a seed the tokenizer did not see")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--frame", type=int, default=None, help="square side to compare at (default: the image's)")
    parser.add_argument("--refine", type=int, nargs="+", default=[None], metavar="C",
                        help="candidates per token for decode-aware encoding (0: nearest codes); several: compare")
    parser.add_argument("--json", default="benchmarks/results/tokenizer.json")
    args = parser.parse_args()

    tok = MaskTokenizer.from_pretrained(args.tokenizer)
    masks, kinds = load_masks([args.data], args.n, args.frame)
    first, *others = args.refine
    out = {"tokenizer": args.tokenizer, **evaluate(tok, masks, kinds=kinds, refine=first)}
    print(report(out))
    for c in others:
        out.setdefault("refine", {})[str(c)] = extra = evaluate(tok, masks, kinds=kinds, refine=c)
        print(report(extra))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
