"""Round-trip quality and speed of a HiMT mask tokenizer on held-out masks.

    python benchmarks/tokenizer.py --tokenizer checkpoints/synthref-himtok/mask_tokenizer --data data/synthref-s1 [--n 500]

Prints mean IoU of encode -> decode(keep=k) for k = 1, 2, 4, 8, 16, 32 at the masks' square frame, codebook
usage (share of codes used, perplexity), encode/decode milliseconds, and the round trip of a shape unlike any
training mask (scikit-image's horse silhouette, when scikit-image is installed). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.masks import decode_segmentation  # noqa: E402
from mmseg.modeling.mask_tokenizer import MaskTokenizer  # noqa: E402
from mmseg.train_tokenizer import letterbox_mask  # noqa: E402


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="SynthRef root of a seed the tokenizer did not see")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--json", default="benchmarks/results/tokenizer.json")
    args = parser.parse_args()

    tok = MaskTokenizer.from_pretrained(args.tokenizer)
    size = tok.config.mask_size * 2
    inst = json.loads((Path(args.data) / "synthref" / "instances.json").read_text())
    images = {im["id"]: im for im in inst["images"]}
    anns = inst["annotations"][: args.n]
    masks = [letterbox_mask(decode_segmentation(a["segmentation"], images[a["image_id"]]["height"],
                                                images[a["image_id"]]["width"]), size) for a in anns]
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= tok.config.num_tokens]
    start = time.perf_counter()
    ids = torch.cat([tok.encode(torch.from_numpy(np.stack(masks[i : i + 64]))) for i in range(0, len(masks), 64)])
    encode_ms = (time.perf_counter() - start) * 1000 / len(masks)
    results = {}
    for k in ks:
        start = time.perf_counter()
        logits = torch.cat([tok.decode(ids[i : i + 64], keep=k, size=(size, size)) for i in range(0, len(ids), 64)])
        decode_ms = (time.perf_counter() - start) * 1000 / len(masks)
        results[k] = {"iou": statistics.mean(iou(l.numpy() > 0, m) for l, m in zip(logits, masks)), "decode_ms": decode_ms}
    counts = torch.bincount(ids.flatten(), minlength=tok.config.codebook_size).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    usage = float((counts > 0).float().mean())
    out = {"tokenizer": args.tokenizer, "n_masks": len(masks), "round_trip": results, "encode_ms": encode_ms,
           "codes_used_share": usage, "code_perplexity": perplexity}
    try:
        from skimage import data as skdata

        horse = ~skdata.horse().astype(bool)  # the silhouette is dark on white
        frame = letterbox_mask(horse, size)
        out["horse_iou"] = iou(tok.decode(tok.encode(frame), size=(size, size)).numpy() > 0, frame)
    except ImportError:
        out["horse_iou"] = None
    print(f"{'k':>4}{'IoU':>8}{'decode ms':>11}")
    for k, r in results.items():
        print(f"{k:>4}{r['iou']:>8.3f}{r['decode_ms']:>11.2f}")
    print(f"encode {encode_ms:.2f} ms/mask; codes used {usage:.1%}; perplexity {perplexity:.0f}; "
          f"horse silhouette IoU {out['horse_iou'] if out['horse_iou'] is None else round(out['horse_iou'], 3)}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
