"""A memo with a memory budget, for training inputs that do not change between epochs.

Training has no augmentation that touches pixels, so an image's model input, its patch-label maps and a target's
placed mask are the same every time a sample is drawn again. On a 2-core CPU, decoding the PNG, resizing, and
painting label maps cost about as much as the model's step itself (see ``benchmarks/train_step.py``), and a
60-minute run draws each SynthRef image about 15 times. The memo keeps what it has room for and then stops
inserting: draws are uniform at random, so keeping the first entries serves as well as any eviction policy and
costs nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import numpy as np
import torch


def nbytes(value: Any) -> int:
    """Memory held by a (nested tuple/list of) tensors or arrays; other leaves count as 64 bytes."""
    if torch.is_tensor(value):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 64


class BudgetMemo:
    """``memo.get(key, make)``: ``make()`` once per key while the budget lasts (then it is called every time).

    Cached values are returned as they are: callers must not modify them in place.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[Hashable, Any] = {}

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        found = self._store.get(key, _MISSING)
        if found is not _MISSING:
            self.hits += 1
            return found
        self.misses += 1
        value = make()
        size = nbytes(value)
        if self.used + size <= self.budget:
            self._store[key] = value
            self.used += size
        return value

    def clear(self) -> None:
        self._store.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._store)


_MISSING = object()
