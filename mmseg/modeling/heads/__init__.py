"""Mask heads. Importing this package registers every built-in head."""

from mmseg.modeling.heads.base import HEADS, MaskHead, MaskPrediction, build_head, head_config, list_heads
from mmseg.modeling.heads import himtok as _himtok  # noqa: F401  (registers "himtok")
from mmseg.modeling.heads import shaper as _shaper  # noqa: F401  (registers "shaper")
from mmseg.modeling.heads import stamp as _stamp  # noqa: F401  (registers "stamp")

__all__ = ["HEADS", "MaskHead", "MaskPrediction", "build_head", "head_config", "list_heads"]
