"""Helpers shared by the UI tests (no tests here): a tiny segmenter that always answers with a mask, a
launched app, the committed checkpoint's whereabouts, and IoU."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHECKPOINT = ROOT / "checkpoints" / "synthref-stamp"
SCREENSHOTS = ROOT / "ui" / "screenshots"


def has_checkpoint() -> bool:
    return (CHECKPOINT / "config.json").exists() and any(CHECKPOINT.glob("*.safetensors"))


def needs_checkpoint():
    return pytest.mark.skipif(not has_checkpoint(), reason=(
        f"no trained checkpoint at {CHECKPOINT.relative_to(ROOT)}/ (config.json + *.safetensors); "
        "train or commit it to run this test"))


def forced_segmenter(seed: int = 5, answer: str = "seg"):
    """A tiny untrained Segmenter whose head forces the answer ``<seg>`` then end (so it always gives a mask)."""
    from mmseg.predictor import Segmenter
    from tiny import force_answer, tiny_model

    model, proc = tiny_model(seed=seed)
    model.head.constrain = force_answer([proc.seg_token_id, proc.eos_token_id])
    return Segmenter(model, proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(demo):
    """Launch ``demo`` the way app.py does (queue, upload limit) on a free localhost port; yields its URL."""
    from ui import launch

    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                       quiet=True)
    try:
        yield url
    finally:
        demo.close()


def examples() -> list[dict]:
    return json.loads((EXAMPLES / "examples.json").read_text())["examples"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
