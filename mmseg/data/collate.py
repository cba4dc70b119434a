"""Training examples and batching: (image, prompt, answer, mask) -> the model's batch dict."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from mmseg.data.cache import BudgetMemo
from mmseg.data.prompts import (LIST_TEMPLATES, list_objects_answer, region_phrase, relational_answer, segment_answer,
                                 segment_prompt, target_description)
from mmseg.data.synthetic import split_relation
from mmseg.imageio import load_image
from mmseg.masks import mask_digest
from mmseg.modeling.heads.base import MaskHead
from mmseg.modeling.patch_probe import SIZE_FAMILY, size_class
from mmseg.processing import Processor

# The refs' ``expr_type`` of expressions whose object is absent (SynthRef; real refCOCO has no such type).
NO_TARGET_TYPE = "no_target"


@dataclass(frozen=True)
class Example:
    """One training conversation turn. ``mask``: bool ``(H, W)`` at the original size, None when the answer
    refers to no mask."""

    image_path: Path
    prompt: str
    answer: str
    mask: np.ndarray | None
    # Every annotated object of the image, ``(bool mask (H, W), {"kind": ..., "color": ...})``, for the model's
    # patch probe (empty when unknown).
    objects: tuple = ()
    # Where the answer comes from, bool ``(H, W)``: the target (all False for a no-target expression), the objects a
    # question is about, every object of a listing; None when unknown. Supervises the model's grounding probe.
    focus: np.ndarray | None = None


def reasoned_answer(refer, sample) -> str | None:
    """The two-step answer (:func:`~mmseg.data.prompts.relational_answer`) to a relational SynthRef sentence of
    ``refer`` (a :class:`~mmseg.data.refer.ReferDataset`), with or without a target; None for any other sentence,
    or when the anchor is not one annotated object of the image or the target cannot be described."""
    parts = split_relation(sample.sentence)
    if parts is None or int(sample.image_id) not in refer.images:
        return None
    anchors = [mask for mask, labels in refer.image_objects(int(sample.image_id))
               if parts.anchor_desc.accepts(labels.get("color"), labels.get("kind"))]
    region = region_phrase(anchors[0]) if len(anchors) == 1 else None
    description = target_description(sample) if sample.has_target else None
    if region is None or (sample.has_target and description is None):
        return None
    return relational_answer(parts.anchor, region, parts.subject, parts.relation, description)


def training_answer(refer, sample, describe_targets: bool = True, reason_relations: bool = False) -> str:
    """The answer a preset trains for a referring ``sample`` of ``refer``: with ``reason_relations``, the two-step
    answer where there is one (:func:`reasoned_answer`); else :func:`~mmseg.data.prompts.segment_answer`, naming
    the target first with ``describe_targets``. Settings as ``train.describe_targets`` and
    ``train.reason_relations``."""
    if describe_targets and reason_relations:
        answer = reasoned_answer(refer, sample)
        if answer is not None:
            return answer
    return segment_answer(sample.has_target, target_description(sample) if describe_targets else None)


class ExamplePool:
    """Referring-segmentation samples and QA pairs of one split, drawn by index with a caller's RNG."""

    def __init__(self, refer, qa: Sequence[dict], image_root: Path, describe_targets: bool = True,
                 with_objects: bool = False, reason_relations: bool = False) -> None:
        self.refer = refer
        self.describe_targets = describe_targets
        self.reason_relations = reason_relations  # relational answers in two steps (see reasoned_answer)
        self._answers: dict[int, str] = {}
        self.with_objects = with_objects  # attach every object of the image (for a patch probe)
        self._image_ids = sorted({int(r["image_id"]) for r in refer.refs})  # for object listings
        self.qa = list(qa)
        self.image_root = Path(image_root)
        # Sample indices per expression type (from the refs file; no mask decoding) for curricula.
        self.by_type: dict[str, list[int]] = {}
        for index in range(len(refer)):
            kind = str(refer.ref_of(index).get("expr_type") or "unknown")
            self.by_type.setdefault(kind, []).append(index)

    def segmentation(self, index: int, rng: random.Random) -> Example:
        sample = self.refer[index]
        mask = sample.mask if sample.has_target else None
        if index not in self._answers:  # memoised: finding a mask's centre is a full-image scan
            self._answers[index] = training_answer(self.refer, sample, self.describe_targets, self.reason_relations)
        return Example(sample.image_path, segment_prompt(sample.sentence, rng), self._answers[index], mask,
                       self._objects(sample.image_id), focus=sample.mask)

    def question(self, index: int) -> Example:
        item = self.qa[index]
        focus = None
        if item.get("ann_ids") is not None and item.get("image_id") is not None and int(item["image_id"]) in self.refer.images:
            focus = self.refer.union_mask(int(item["image_id"]), item["ann_ids"])
        return Example(self.image_root / item["file_name"], item["question"], item["answer"], None,
                       self._objects(item.get("image_id")), focus=focus)

    def _objects(self, image_id: int | None) -> tuple:
        if not self.with_objects or image_id is None or int(image_id) not in self.refer.images:
            return ()
        return tuple(self.refer.image_objects(int(image_id)))

    def listing(self, rng: random.Random) -> Example:
        """"Describe the objects in the image." with every object of a random image of this split, in reading order
        (:func:`~mmseg.data.prompts.list_objects_answer`)."""
        image_id = self._image_ids[rng.randrange(len(self._image_ids))]
        objects = tuple(self.refer.image_objects(image_id))
        answer = list_objects_answer(list(objects)) or "I see no objects."
        path = self.refer.image_root / self.refer.images[image_id]["file_name"]
        focus = np.zeros_like(objects[0][0]) if objects else None
        for mask, _ in objects:
            focus |= mask
        return Example(path, rng.choice(LIST_TEMPLATES), answer, None, objects if self.with_objects else (), focus=focus)

    def draw(self, rng: random.Random, qa_fraction: float, types: Sequence[str] | None = None,
             list_fraction: float = 0.0, no_target_fraction: float | None = None,
             type_weights: Mapping[str, float] | None = None) -> Example:
        """An object listing with probability ``list_fraction``, a QA pair with probability ``qa_fraction``, else a
        referring sample (of ``types`` only, if given). ``no_target_fraction`` (None: as the data has them) is the
        share of referring samples drawn from the no-target expressions, whenever ``types`` allows them.
        ``type_weights``: relative weight per sentence of each expression type (unnamed types: 1), so a type's share
        is proportional to its sentence count times its weight."""
        if list_fraction > 0 and rng.random() < list_fraction:
            return self.listing(rng)
        if self.qa and rng.random() < qa_fraction:
            return self.question(rng.randrange(len(self.qa)))
        absent = self.by_type.get(NO_TARGET_TYPE)
        if no_target_fraction is not None and absent and (types is None or NO_TARGET_TYPE in types):
            if rng.random() < no_target_fraction:
                return self.segmentation(absent[rng.randrange(len(absent))], rng)
            types = [t for t in (types if types is not None else sorted(self.by_type)) if t != NO_TARGET_TYPE]
        if types is None and not type_weights:
            return self.segmentation(rng.randrange(len(self.refer)), rng)
        names = [t for t in (types if types is not None else sorted(self.by_type)) if t in self.by_type]
        if not names:
            raise ValueError(f"curriculum types {list(types or [])} match no samples; present: {sorted(self.by_type)}")
        pools = [self.by_type[t] for t in names]
        if type_weights:
            weights = [len(p) * float(type_weights.get(t, 1.0)) for t, p in zip(names, pools)]
            if not sum(weights) > 0:
                raise ValueError(f"type_weights {dict(type_weights)} leave no referring type to draw among {names}")
            pool = rng.choices(pools, weights=weights)[0]
            return self.segmentation(pool[rng.randrange(len(pool))], rng)
        k = rng.randrange(sum(len(p) for p in pools))
        for pool in pools:
            if k < len(pool):
                return self.segmentation(pool[k], rng)
            k -= len(pool)
        raise AssertionError("unreachable")


class Collator:
    """Turns examples into a right-padded batch for :meth:`MMSegModel.forward`.

    Keys: ``input_ids, attention_mask, labels (B, T)``, ``pixel_values (B, 3, S, S)``,
    ``mask_targets (B, S, S)`` in {0, 1} placed like the letterboxed image, ``seg_positions (B,)``
    (index of the first mask point in the expanded text, -1 if none: ``<seg>``, or the token the head's
    ``mask_point_token_id`` names, e.g. HiMTok's ``<mt_start>``). With ``patch_labels``: ``patch_labels
    (B, F, S, S)`` (a ``"size"`` family is derived from each object's mask with ``size_bins``, see
    :func:`~mmseg.modeling.patch_probe.size_class`). With ``focus``: ``focus_targets (B, S, S)`` in {0, 1} (each
    example's ``focus``, placed like the image) and ``focus_valid (B,)`` bool (False where the example's focus is
    unknown).
    """

    def __init__(self, processor: Processor, head: MaskHead, patch_labels: dict[str, list[str]] | None = None,
                 focus: bool = False, cache_mb: float = 0.0, size_bins: Sequence[float] = ()) -> None:
        self.processor = processor
        self.head = head
        self.focus = focus
        # Memo of per-image inputs and placed masks (no augmentation changes them between epochs); 0 = off.
        self.memo = BudgetMemo(int(cache_mb * 2**20))
        # family -> {class name: index (1-based; 0 = background)}, for ``patch_labels (B, F, S, S)``
        self.label_index = {f: {c: i + 1 for i, c in enumerate(names)} for f, names in (patch_labels or {}).items()}
        # With a "size" family among patch_labels: each object's class is derived from its mask with these bins
        # (see mmseg.modeling.patch_probe.size_class), not read from its annotation.
        self.size_bins = tuple(size_bins)
        if bool(self.size_bins) != (SIZE_FAMILY in self.label_index):
            raise ValueError(f'patch_labels\' "{SIZE_FAMILY}" family and size_bins go together (pass both or neither; '
                             "the model's families are model.probe.families, its bins config.patch_size_bins)")

    def __call__(self, examples: Sequence[Example], seeds: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``seeds``: one per example, for what the head draws when it expands targets (None: its own draws)."""
        if seeds is not None and len(seeds) != len(examples):
            raise ValueError(f"{len(seeds)} seeds for {len(examples)} examples")
        proc = self.processor
        rows, labels, pixels, targets, label_maps, focus = [], [], [], [], [], []
        for i, ex in enumerate(examples):
            px, box = self.memo.get(("image", ex.image_path), lambda: proc.preprocess_image(load_image(ex.image_path)))
            if self.label_index:
                label_maps.append(self.memo.get(("labels", ex.image_path, len(ex.objects)),
                                                lambda: self._label_maps(ex.objects, box).to(torch.int16)).long())
            target = self._place(ex.image_path, ex.mask, box) if ex.mask is not None else torch.zeros(proc.image_size, proc.image_size)
            ids, lab = proc.encode_chat([{"role": "user", "content": ex.prompt}], ex.answer)
            ids, lab = self.head.expand_targets(ids, lab, target if ex.mask is not None else None,
                                                rng=random.Random(seeds[i]) if seeds is not None else None)
            rows.append(ids)
            labels.append(lab)
            pixels.append(px)
            targets.append(target)
            if self.focus:
                if ex.focus is None:
                    focus.append(None)
                elif ex.focus is ex.mask:  # a referring target: already placed
                    focus.append(target)
                else:
                    focus.append(self._place(ex.image_path, ex.focus, box))
        width = max(len(r) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, width), proc.pad_token_id, dtype=torch.long)
        label_ids = torch.full((b, width), -100, dtype=torch.long)
        attention = torch.zeros(b, width, dtype=torch.long)
        seg_positions = torch.full((b,), -1, dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(ids)] = 1
            if self.head.mask_point_token_id in ids:
                seg_positions[i] = ids.index(self.head.mask_point_token_id)
        batch = {
            "input_ids": input_ids, "attention_mask": attention, "labels": label_ids,
            "pixel_values": torch.stack(pixels), "mask_targets": torch.stack(targets), "seg_positions": seg_positions,
        }
        if self.label_index:
            batch["patch_labels"] = torch.stack(label_maps)
        if self.focus:
            blank = torch.zeros(proc.image_size, proc.image_size)
            batch["focus_targets"] = torch.stack([blank if f is None else f for f in focus])
            batch["focus_valid"] = torch.tensor([f is not None for f in focus])
        return batch

    def _place(self, image_path: Path, mask: np.ndarray, box) -> torch.Tensor:
        """:meth:`ImageTransform.mask_to_input` of an original-size bool mask, memoised by the mask's content. The
        placed mask is ``k / 255`` for a uint8 ``k`` (a resampled 8-bit mask), so the memo keeps ``k`` and this
        returns the identical float ``(S, S)``."""
        key = ("mask", image_path, mask_digest(mask))
        placed = self.memo.get(key, lambda: (self.processor.transform.mask_to_input(mask, box) * 255).round().to(torch.uint8))
        return placed.float() / 255.0

    def _label_maps(self, objects: Sequence, box) -> torch.Tensor:
        """``(F, S, S)`` long pixel labels per family, placed like the letterboxed image: 0 = background, -100 =
        unknown (an image with no object list, or an object without that family's label)."""
        size = self.processor.image_size
        maps = torch.zeros(len(self.label_index), size, size, dtype=torch.long)
        if not objects:
            return maps.fill_(-100)
        for mask, names in objects:
            if self.size_bins:
                names = {**names, SIZE_FAMILY: size_class(mask, self.size_bins)}
            inside = self.processor.transform.mask_to_input(mask, box) > 0.5
            for f, (family, index) in enumerate(self.label_index.items()):
                maps[f][inside] = index.get(names.get(family, ""), -100)
        return maps
