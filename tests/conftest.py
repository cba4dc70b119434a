"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthref_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SynthRef dataset (60 train, 45 val, 30 testA, 30 testB images at 128 px), built once."""
    from mmseg.data.synthetic import write_synthref

    root = tmp_path_factory.mktemp("synthref")
    write_synthref(root, seed=0, n_train=60, n_val=45, n_test=30, image_size=128, progress=False)
    return root


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide state (mixed precision, process count); tests that train or shard in-process
    each start from a clean slate, as separate command runs would."""
    yield
    import sys

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
