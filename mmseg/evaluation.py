"""Quick in-process evaluation used during training and for model cards (the full benchmark evaluator with
streaming, resume and sharding lives in the top-level ``eval`` package)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

import numpy as np

from mmseg.data.prompts import EVAL_TEMPLATE, target_description
from mmseg.metrics import SegMetrics


def predicted_mask(answer, shape: tuple[int, int]) -> np.ndarray:
    """The union of an answer's masks as bool ``(H, W)`` (all False when it gave none)."""
    out = np.zeros(shape, dtype=bool)
    for mask in answer.masks:
        out |= mask
    return out


def evaluate_refer(segmenter, dataset, indices: Sequence[int] | None = None, batch_size: int = 16,
                   template: str = EVAL_TEMPLATE, progress: bool = False, **options) -> dict:
    """Referring segmentation with the model's OWN generated answers (never teacher-forced).

    Returns LISA-style metrics (``ciou``, ``giou``, ``prec@t``, ``no_target_acc`` ...) plus ``by_type``: cIoU
    and count per expression type, and ``named``: the share of sentences with a describable target whose answer
    contains its description (:func:`target_description`, which the presets train answers to say before the
    mask; None when no sentence has one). A relational expression is resolved in those words first, so ``named``
    tells a reasoning failure from a drawing one (see ``benchmarks/description.py``).
    """
    from tqdm.auto import tqdm

    indices = list(range(len(dataset))) if indices is None else list(indices)
    overall = SegMetrics()
    by_type: dict[str, SegMetrics] = defaultdict(SegMetrics)
    named = [0, 0]  # answers naming their target's description, sentences with one
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    for chunk in tqdm(chunks, desc="evaluate", disable=not progress, unit="batch"):
        samples = [dataset[i] for i in chunk]
        conversations = [[{"role": "user", "content": template.format(expression=s.sentence)}] for s in samples]
        answers = segmenter.batch(conversations, [s.image_path for s in samples], **options)
        for sample, answer in zip(samples, answers):
            description = target_description(sample)
            if description is not None:
                named[0] += description in answer.text
                named[1] += 1
            pred = predicted_mask(answer, sample.mask.shape)
            overall.update(pred, sample.mask, has_target=sample.has_target)
            by_type[sample.expr_type or "unknown"].update(pred, sample.mask, has_target=sample.has_target)
    result = overall.compute()
    result["by_type"] = {k: {"ciou": v.compute()["ciou"], "n": v.compute()["n"]} for k, v in sorted(by_type.items())}
    result["named"] = named[0] / named[1] if named[1] else None
    return result


def normalise_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def evaluate_qa(segmenter, items: Sequence[dict], image_root, batch_size: int = 16) -> dict:
    """Exact match of the model's short answers to understanding questions (case and punctuation ignored)."""
    from pathlib import Path

    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        answers = segmenter.batch([[{"role": "user", "content": q["question"]}] for q in chunk],
                                  [Path(image_root) / q["file_name"] for q in chunk])
        correct += sum(normalise_answer(a.text) == normalise_answer(q["answer"]) for a, q in zip(answers, chunk))
    return {"qa_exact_match": correct / max(1, len(items)), "qa_n": len(items)}
