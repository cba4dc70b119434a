"""Prompt and answer templates: the conversation contract between data, training and evaluation."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

# Training draws one of these per sample so that free-form user phrasing still reaches the segmentation skill.
SEGMENT_TEMPLATES = (
    "Please segment {expression}.",
    "Segment {expression}.",
    "Where is {expression}?",
    "Can you segment {expression} in this image?",
    "Show me {expression}.",
    "{expression}",
)
# The evaluator's fixed prompt (printed with every result; overridable there).
EVAL_TEMPLATE = "Please segment {expression}."
TARGET_ANSWER = "Sure, <seg>."
DESCRIBED_TARGET_ANSWER = "Sure, {description} <seg>."
NO_TARGET_ANSWER = "There is no such object in the image."
# Answers to relational expressions that first say where the anchor is, then which object stands in the relation
# to it (see relational_answer).
RELATIONAL_TARGET_ANSWER = "{anchor} is {anchor_region}, and the {subject} {relation} it is {description} <seg>."
RELATIONAL_NO_TARGET_ANSWER = "{anchor} is {anchor_region}, and there is no {subject} {relation} it."

# Where an object's centre lies, in thirds of the image: (row, column) -> phrase.
_REGION_PHRASES = {
    ("top", "left"): "at the top left", ("top", "middle"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "middle"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "middle"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}
REGION_PHRASES = tuple(_REGION_PHRASES.values())


def segment_prompt(expression: str, rng: random.Random | None = None) -> str:
    template = rng.choice(SEGMENT_TEMPLATES) if rng is not None else EVAL_TEMPLATE
    return template.format(expression=expression)


_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "middle", "right")


def _region(mask: np.ndarray) -> tuple[int, int, float, float] | None:
    """``(row, column, centre y, centre x)`` of a bool mask's centre; row and column index thirds of the image."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    h, w = mask.shape
    cy, cx = float(ys.mean()), float(xs.mean())
    return min(2, int(3 * cy / h)), min(2, int(3 * cx / w)), cy, cx


def region_phrase(mask: np.ndarray) -> str | None:
    """Where the centre of a bool ``(H, W)`` mask lies, in thirds of the image ("at the top left", "in the
    center", ...); None for an empty mask."""
    region = _region(mask)
    return None if region is None else _REGION_PHRASES[(_ROWS[region[0]], _COLS[region[1]])]


def target_description(sample: Any) -> str | None:
    """A noun phrase naming a referring sample's target by what it looks like and where it is, e.g. "the red
    circle at the top left" (SynthRef, whose annotations carry a colour) or "the person on the right" (refCOCO's
    category). None for no-target or multi-object samples.

    Answers that say which object they mean before ``<seg>`` turn the hard part of grounding (which object a
    relational expression picks out) into next-token prediction with a dense, direct loss, and leave the mask
    step to find an object of a named colour and kind in a named region. It is also what a user wants to read.
    """
    if not sample.has_target or sample.category is None:
        return None
    region = region_phrase(sample.mask)
    if region is None:
        return None
    color = (sample.attributes or {}).get("color")
    noun = f"{color} {sample.category}" if color else str(sample.category)
    return f"the {noun} {region}"


def segment_answer(has_target: bool, description: str | None = None) -> str:
    """The answer to a segmentation prompt: refuse when there is no target, else ``<seg>`` (after a description
    of the target when one is given)."""
    if not has_target:
        return NO_TARGET_ANSWER
    return DESCRIBED_TARGET_ANSWER.format(description=description) if description else TARGET_ANSWER


def relational_answer(anchor: str, anchor_region: str, subject: str, relation: str,
                      description: str | None) -> str:
    """The answer to a relational request ("the star left of the red star") that reasons in two written steps:
    where the anchor is, then which object stands in the relation to it, e.g. "The red star is at the top right,
    and the star left of it is the blue star at the top <seg>." or, with ``description`` None (no such object),
    "The red star is at the top right, and there is no star left of it."

    Why: a one-step answer must find the anchor, compare every candidate with it and name the winner within the
    tokens of one description. Written out, finding the anchor is the attribute task the model already does well,
    and the target's words are predicted with the anchor's place and the relation in the context just before them.

    ``anchor``, ``subject``: noun phrases as the request words them ("red star", "star", "object");
    ``anchor_region``: :func:`region_phrase` of the anchor; ``description``: :func:`target_description`.
    """
    anchor = f"The {anchor}"
    if description is None:
        subject = "object" if subject == "one" else subject  # "there is no one left of it" reads as a person
        return RELATIONAL_NO_TARGET_ANSWER.format(anchor=anchor, anchor_region=anchor_region, subject=subject,
                                                  relation=relation)
    return RELATIONAL_TARGET_ANSWER.format(anchor=anchor, anchor_region=anchor_region, subject=subject,
                                           relation=relation, description=description)


# Object listing: an understanding task whose answer reads every object off the image in a fixed order, so the
# LM learns to attend to its image tokens by position before it must find them by content.
LIST_TEMPLATES = (
    "Describe the objects in the image.",
    "What is in this image?",
    "List the objects you see.",
)


def article(word: str) -> str:
    """The indefinite article for ``word``: "an" before a vowel letter, else "a"."""
    return "an" if word[:1] in "aeiou" else "a"


def list_objects_answer(objects: list[tuple[np.ndarray, dict[str, str]]]) -> str | None:
    """``[(bool mask (H, W), {"kind": ..., "color": ...}), ...]`` -> "There are 3 objects: a red circle at the top
    left, a blue square in the center and an orange star at the bottom right." Objects are listed in reading order
    of their regions (top row first, left to right), then by their centres. None when no object has a kind."""
    items = []
    for mask, labels in objects:
        region, kind = _region(mask), labels.get("kind")
        if kind is None or region is None:
            continue
        noun = f"{labels['color']} {kind}" if labels.get("color") else kind
        # sorting by (row, column, centre) gives reading order
        items.append((region, f"{article(noun)} {noun} {_REGION_PHRASES[(_ROWS[region[0]], _COLS[region[1]])]}"))
    if not items:
        return None
    phrases = [p for _, p in sorted(items, key=lambda item: item[0])]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    count = "There is 1 object" if len(phrases) == 1 else f"There are {len(phrases)} objects"
    return f"{count}: {listed}."
