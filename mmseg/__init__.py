"""mmseg: a vision-language model that talks about an image and segments what it talks about.

Public API: :class:`mmseg.Segmenter` (``from_pretrained``, ``__call__``, ``chat``) and :class:`mmseg.Answer`.
Nothing heavy happens at import.
"""

__version__ = "0.1.0"

__all__ = ["Segmenter", "Answer", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import mmseg` stays cheap (no torch/transformers import until used).
    if name in ("Segmenter", "Answer"):
        from mmseg import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'mmseg' has no attribute {name!r}")
