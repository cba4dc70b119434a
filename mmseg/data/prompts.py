"""Prompt and answer templates: the conversation contract between data, training and evaluation."""

from __future__ import annotations

import random

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
NO_TARGET_ANSWER = "There is no such object in the image."


def segment_prompt(expression: str, rng: random.Random | None = None) -> str:
    template = rng.choice(SEGMENT_TEMPLATES) if rng is not None else EVAL_TEMPLATE
    return template.format(expression=expression)


def segment_answer(has_target: bool) -> str:
    return TARGET_ANSWER if has_target else NO_TARGET_ANSWER
