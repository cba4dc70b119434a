"""The chat-and-segment web interface (Gradio) over :class:`mmseg.Segmenter`.

``build_app(segmenters)`` makes the ``gr.Blocks`` app, ``load_segmenters()`` loads the models that
``MMSEG_MODEL`` or ``checkpoints/`` name, ``launch(demo)`` queues and serves it. ``app.py`` at the repo root
does all three. Modules: ``ui.core`` (inputs, answers, masks; no Gradio), ``ui.render`` (what an answer
looks like), ``ui.app`` (layout, events, API endpoints).
"""

from ui.app import build_app, checkpoint_folders, launch, load_segmenters

__all__ = ["build_app", "checkpoint_folders", "launch", "load_segmenters"]
