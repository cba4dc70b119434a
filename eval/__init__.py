"""The refCOCO benchmark evaluator: ``python -m eval refcoco ...`` and ``python -m eval compare RUN_DIR...``.

One sample per sentence in a fixed order, a fixed (printed, overridable) prompt, masks compared at the original
image size, failures counted as empty masks, predictions streamed to ``DIR/predictions.jsonl`` so that a rerun
resumes, and sharding over ``accelerate launch`` without padding. See ``eval/README.md``.

Modules: :mod:`eval.cli` (the command), :mod:`eval.runner` (inference, streaming, resume, sharding),
:mod:`eval.layouts` (REFER and lmms-lab parquet readers), :mod:`eval.report` (Markdown / HTML),
:mod:`eval.compare` (one table across runs). Importing this package is cheap (no torch).
"""

__all__ = ["run_eval"]


def __getattr__(name: str):
    if name == "run_eval":
        from eval.runner import run_eval

        return run_eval
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
