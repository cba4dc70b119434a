"""Does the answer name the right object, and does the mask follow the answer? Per SynthRef split.

    python benchmarks/description.py --model checkpoints/synthref-himtok --data data/synthref-s1 \
        [--splits val testB] [--limit 200] [--json out.json]

Our presets train target answers that name the referent before the mask ("Sure, the red cross at the bottom left
<seg>.", :func:`mmseg.data.prompts.target_description`), so a referring expression is resolved twice: in words,
by next-token prediction, and in the mask the head draws after them. This benchmark separates the two. Over every
k-th sentence with a target (at most ``--limit``), it reports

- ``named``: the share of the model's own answers that contain the true description exactly, and
  ``named_object``: the share that name the referent's colour and kind ("the red cross"), place aside;
- ``ciou_own``: cIoU with the model's own answers (as ``synthref_eval.py``), and split into the sentences whose
  answer was right (``ciou_named``) and wrong (``ciou_misnamed``);
- ``ciou_forced``: cIoU with the true answer forced up to the mask point (the model draws the mask given the
  right words): the answer the model was trained to give (its ``train_config.json``; the two-step answer to a
  relational request with ``train.reason_relations``).

Reading it: low ``named`` is a reasoning failure in the text; ``ciou_forced`` well below the attribute sentences'
cIoU means the mask does not follow the words. Session 18 on seed-1 testB (200 sentences): ``synthref-stamp``
named 0.78, own 0.77, forced 0.92; ``synthref-himtok`` named 0.26, own 0.51, forced 0.66.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.config import trained_answer_form  # noqa: E402
from mmseg.data.collate import training_answer  # noqa: E402
from mmseg.data.prompts import EVAL_TEMPLATE, target_description  # noqa: E402
from mmseg.data.refer import ReferDataset  # noqa: E402
from mmseg.evaluation import predicted_mask  # noqa: E402
from mmseg.generation import answer_prefix_ids, generate  # noqa: E402
from mmseg.imageio import load_image  # noqa: E402
from mmseg.predictor import Segmenter, logits_to_original  # noqa: E402


def named_part(text: str) -> str:
    """The words of an answer that name its target: after " it is " in a two-step relational answer ("The red star
    is at the top right, and the star left of it is the blue star at the top"), so that the request's words
    restated before it never count; the whole text otherwise."""
    return text.rsplit(" it is ", 1)[-1]


def _stats(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.array([(pred & target).sum(), (pred | target).sum()], dtype=np.float64)


@torch.no_grad()
def described(segmenter: Segmenter, dataset: ReferDataset, limit: int | None = None, batch_size: int = 16,
              answer_form: tuple[bool, bool] = (True, False)) -> dict:
    """The figures above for one split (see the module docstring). ``answer_form``: ``(describe_targets,
    reason_relations)`` the model was trained with (:func:`~mmseg.config.trained_answer_form`), which choose the
    forced answer's form."""
    describe, reason = answer_form
    model, processor = segmenter.model, segmenter.processor
    model.eval()
    indices = [i for i in range(len(dataset)) if target_description(dataset[i]) is not None]
    if limit is not None:
        indices = indices[:: max(1, len(indices) // limit)][:limit]
    if not indices:
        raise SystemExit("error: no sentence of this split has a target with a description")
    tally = {key: np.zeros(2) for key in ("own", "forced", "named", "misnamed")}
    named = named_object = 0
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start : start + batch_size]]
        conversations = [[{"role": "user", "content": EVAL_TEMPLATE.format(expression=s.sentence)}] for s in samples]
        own = segmenter.batch(conversations, [s.image_path for s in samples])
        pixels, boxes = zip(*(processor.preprocess_image(load_image(s.image_path)) for s in samples))
        forced = generate(
            model, [processor.encode_chat(c)[0] for c in conversations], torch.stack(pixels).to(model.device),
            eos_token_id=processor.eos_token_id, pad_token_id=processor.pad_token_id,
            max_new_tokens=segmenter.max_new_tokens,
            answer_prefix=[answer_prefix_ids(processor, training_answer(dataset, s, describe, reason),
                                             model.head.mask_point_token_id) for s in samples],
        )
        for row, sample in enumerate(samples):
            description = target_description(sample)
            color = (sample.attributes or {}).get("color")
            noun = f"the {color} {sample.category}" if color else f"the {sample.category}"
            right = description in named_part(own[row].text)
            named += right
            named_object += noun in named_part(own[row].text)
            stats = _stats(predicted_mask(own[row], sample.mask.shape), sample.mask)
            tally["own"] += stats
            tally["named" if right else "misnamed"] += stats
            pred = np.zeros(sample.mask.shape, dtype=bool)
            for mask in forced.masks[row]:
                full = logits_to_original(mask.logits, boxes[row], processor.image_size).float().cpu()
                pred |= (full > segmenter.threshold).numpy()
            tally["forced"] += _stats(pred, sample.mask)

    def ciou(key: str) -> float | None:
        inter, union = tally[key]
        return float(inter / union) if union else None

    n = len(indices)
    return {"n": n, "named": named / n, "named_object": named_object / n, "ciou_own": ciou("own"),
            "ciou_named": ciou("named"), "ciou_misnamed": ciou("misnamed"), "ciou_forced": ciou("forced")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="SynthRef root (use a seed the model was not trained on)")
    parser.add_argument("--splits", nargs="+", default=["val", "testB"])
    parser.add_argument("--limit", type=int, default=200, help="every k-th sentence so that at most N remain")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    segmenter = Segmenter.from_pretrained(args.model)
    form = trained_answer_form(args.model)
    results = {split: described(segmenter, ReferDataset(args.data, "synthref", "unc", split), args.limit,
                                answer_form=form)
               for split in args.splits}
    columns = ("named", "named_object", "ciou_own", "ciou_named", "ciou_misnamed", "ciou_forced")
    print(f"{'split':8s} {'n':>4s} " + " ".join(f"{c:>13s}" for c in columns))
    for split, row in results.items():
        cells = " ".join(f"{'-' if row[c] is None else format(row[c], '.3f'):>13s}" for c in columns)
        print(f"{split:8s} {row['n']:4d} {cells}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "data": args.data, "limit": args.limit,
                                               "splits": results}, indent=2))
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
