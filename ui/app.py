"""The Gradio app: layout, events and the named API endpoints (``/segment``, ``/chat``).

>>> from mmseg import Segmenter
>>> from ui import build_app, launch
>>> demo = build_app(Segmenter.from_pretrained("checkpoints/synthref-stamp"))
>>> launch(demo)   # honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ui.core import (
    MAX_CHARS,
    MAX_KEEP_TOKENS,
    WORK_SIDE,
    Heads,
    Prepared,
    Result,
    UserError,
    answer,
    clean_history,
    clean_message,
    head_sort_key,
    keep_tokens_option,
    prepare_image,
)
from ui.render import (
    Downloads,
    chat_messages,
    color_map,
    notes_text,
    overlay_value,
    timings_text,
)

log = logging.getLogger("mmseg.ui")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MAX_FILE_SIZE = os.environ.get("MMSEG_MAX_FILE_SIZE", "50mb")  # upload limit (Gradio's max_file_size)
CONCURRENCY = int(os.environ.get("MMSEG_CONCURRENCY", "2"))  # model calls running at once; the rest queue
QUEUE_SIZE = int(os.environ.get("MMSEG_QUEUE_SIZE", "64"))
SEGMENT_PROMPT = "Please segment {expression}."  # the evaluator's prompt (mmseg.data.prompts.EVAL_TEMPLATE)
PHOTO_QUERIES = {"astronaut.jpg": "Please segment the astronaut.", "coffee.jpg": "Please segment the cup.",
                 "chelsea.jpg": "Please segment the cat."}

CSS = """
#overlay img { object-fit: contain; }
#status:empty { display: none; }
@media (max-width: 640px) {
  .gradio-container { padding: 6px !important; }
  #title h1 { font-size: 1.3rem; }
}
"""


def upload_image(**kwargs: Any) -> gr.Image:
    """``gr.Image(type="filepath")`` that hands an unreadable upload to our checks instead of failing inside
    Gradio's preprocessing, so that a corrupt or non-image file gets the app's own message. (Patched on the
    instance: a subclass would make Gradio write a .pyi stub next to this file. The app never sends a prop
    update to an image, which would replace the instance.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    preprocess = component.preprocess

    def tolerant(payload):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return preprocess(payload)
        except Exception:
            path = getattr(payload, "path", None)
            if path:
                return path
            raise gr.Error("That upload is not an image I can read.", print_exception=False) from None

    component.preprocess = tolerant
    return component


@dataclass
class Session:
    """Per-browser-session state: the current image (prepared once) and the latest answer."""

    image_key: str | None = None
    prepared: Prepared | None = None
    result: Result | None = None

    def prepare(self, image: Any) -> Prepared:
        key = image if isinstance(image, str) else None
        if key is None or key != self.image_key or self.prepared is None:
            self.prepared = prepare_image(image)
            self.image_key = key
        return self.prepared

    @property
    def history(self) -> list[dict]:
        return self.result.conversation if self.result is not None else []


def example_rows() -> list[list[str]]:
    """[[image path, message]]: the SynthRef examples with their queries, then the real photos."""
    rows = []
    try:
        spec = json.loads((EXAMPLES / "examples.json").read_text())
        for ex in spec.get("examples", []):
            if (EXAMPLES / ex["file"]).exists():
                rows.append([str(EXAMPLES / ex["file"]), SEGMENT_PROMPT.format(expression=ex["query"])])
    except (OSError, ValueError, KeyError):
        log.warning("examples/examples.json is missing or malformed; showing no SynthRef examples")
    for name, query in PHOTO_QUERIES.items():
        if (EXAMPLES / "photos" / name).exists():
            rows.append([str(EXAMPLES / "photos" / name), query])
    return rows


def build_app(segmenters: Any, title: str = "mmseg · chat and segment") -> gr.Blocks:
    """A ``gr.Blocks`` app around one Segmenter, a list of them, or a ``{display name: Segmenter}`` dict."""
    heads = Heads(segmenters)
    downloads = Downloads()
    p0 = round(heads.default_probability(), 2)

    # -- callbacks ------------------------------------------------------------------------------------------
    def _shown(session: Session, result: Result):
        session.result = result
        return (chat_messages(result.conversation), session,
                gr.AnnotatedImage(value=overlay_value(result), color_map=color_map(result)),
                downloads.write(result) or None, timings_text(result), notes_text(result.notes))

    def _failed(err: Exception):
        if isinstance(err, UserError):
            message = str(err)
        else:
            log.exception("request failed")
            message = f"Something went wrong ({type(err).__name__}: {err}). The app is still running; try again."
        gr.Warning(message)
        return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), notes_text(error=message))

    def send(image, message, session, head, tokens, threshold):
        session = session or Session()
        try:
            name, _ = heads.get(head)
            text, notes = clean_message(message)
            prepared = session.prepare(image)
            result = answer(heads, name, prepared, session.history, text, keep_tokens_option(heads, name, tokens),
                            threshold, notes)
        except Exception as err:  # noqa: BLE001 - every failure is shown, the app stays up
            return (*_failed(err), gr.skip())
        return (*_shown(session, result), "")

    def redo_tokens(session, head, tokens, threshold):
        """Tokens slider: the same question again with keep_tokens=k (coarse-to-fine), replacing the answer."""
        if session is None or session.result is None or session.prepared is None:
            return tuple(gr.skip() for _ in range(6))
        last = session.result
        try:
            result = answer(heads, head, session.prepared, last.messages[:-1], last.messages[-1]["content"],
                            keep_tokens_option(heads, head, tokens), threshold, last.message_notes)
        except Exception as err:  # noqa: BLE001
            return _failed(err)
        return _shown(session, result)

    def rethreshold(session, threshold):
        """Threshold slider: redraw from the kept logits, no model call."""
        if session is None or session.result is None:
            return tuple(gr.skip() for _ in range(3))
        result = session.result
        result.rethreshold(threshold)
        return (gr.AnnotatedImage(value=overlay_value(result), color_map=color_map(result)),
                downloads.write(result) or None, timings_text(result))

    def new_image(image, session):
        had_chat = session is not None and session.result is not None
        note = notes_text(["New image: a new conversation starts."]) if had_chat and image is not None else ""
        return [], Session(), None, None, "", note

    def clear():
        return None, "", [], Session(), None, None, "", ""

    def chat_cleared(session):
        """The chat's own trash button: a new conversation about the same image."""
        fresh = Session()
        if session is not None:
            fresh.image_key, fresh.prepared = session.image_key, session.prepared
        return fresh, None, None, "", ""

    def head_changed(head):
        return gr.Slider(visible=heads.takes_tokens(head))

    # -- API endpoints (stateless; what gradio_client calls) -----------------------------------------------
    def segment(image, text, head=""):
        """Segment what `text` asks for in `image` with `head` (the first loaded head when empty).
        Returns the answer text (with a <seg> marker where each mask belongs) and a list of COCO RLE masks
        ({"size": [H, W], "counts": str}) at the original image size."""
        try:
            name, _ = heads.get(head)
            message, notes = clean_message(text)
            result = answer(heads, name, prepare_image(image), [], message, notes=notes)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return result.text, result.rles()

    def chat(image, message, history=None, head="", keep_tokens=0, threshold=None):
        """One turn of a multi-turn chat about `image`. `history`: the earlier turns as a list of
        {"role": "user"|"assistant", "content": str} (pass back details["history"] from the previous call).
        `keep_tokens`: 1..31 mask tokens for a coarse-to-fine head (0 = all); `threshold`: mask probability
        threshold (empty = the head's own). Returns (answer text, COCO RLE masks at the original size,
        details: head, notes, timings_ms, boxes, image_size, history)."""
        try:
            name, _ = heads.get(head)
            text, notes = clean_message(message)
            turns = clean_history(history)
            if threshold is not None and not 0.0 < float(threshold) < 1.0:
                raise UserError("threshold must be a probability between 0 and 1.")
            result = answer(heads, name, prepare_image(image), turns, text,
                            keep_tokens_option(heads, name, keep_tokens), threshold, notes)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        return result.text, result.rles(), result.details()

    # -- layout ---------------------------------------------------------------------------------------------
    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as demo:
        session = gr.State(None, time_to_live=7200)  # also dropped when the tab closes
        gr.Markdown(f"# {title}\nUpload an image, ask about it or say what to segment, then ask follow-ups. "
                    "Every mask of the latest answer is drawn over the image.", elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image = upload_image(label="Image", height=340, sources=["upload", "clipboard", "webcam"],
                                     elem_id="image")
            with gr.Column(scale=1, min_width=300):
                overlay = gr.AnnotatedImage(label="Masks of the latest answer", height=340, elem_id="overlay",
                                           format="png")
        chatbot = gr.Chatbot(label="Chat", height=340, elem_id="chat", feedback_options=None,
                             buttons=["copy", "copy_all"], allow_tags=False,
                             placeholder="Answers appear here. `[mask 1]` in an answer is mask 1 on the image.")
        status = gr.Markdown(elem_id="status")
        with gr.Row(equal_height=True):
            message = gr.Textbox(label="Message", show_label=False, placeholder="e.g. Please segment the red circle.", scale=5,
                                 min_width=120, lines=1, max_lines=4, elem_id="message")
            send_btn = gr.Button("Send", variant="primary", scale=1, min_width=64, elem_id="send")
            clear_btn = gr.Button("Clear", scale=1, min_width=64, elem_id="clear")
        timings = gr.Markdown(elem_id="timings")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                head = gr.Dropdown(choices=heads.names, value=heads.default, label="Head", elem_id="head",
                                   interactive=True)
                tokens = gr.Slider(1, MAX_KEEP_TOKENS, value=MAX_KEEP_TOKENS, step=1, elem_id="tokens",
                                   label="Mask tokens (coarse to fine)", visible=heads.takes_tokens(heads.default))
                threshold = gr.Slider(0.05, 0.95, value=p0, step=0.05, label="Mask threshold (probability)",
                                      elem_id="threshold")
            with gr.Column(scale=1, min_width=260):
                files = gr.File(label="Downloads: mask PNG and COCO RLE JSON (original size)",
                                file_count="multiple", interactive=False, elem_id="downloads")
        rows = example_rows()
        if rows:
            gr.Examples(rows, inputs=[image, message], label="Examples (SynthRef images and photos)",
                        examples_per_page=8)
        gr.Markdown(f"Messages over {MAX_CHARS:,} characters are cut; images over {WORK_SIDE} px are "
                    f"downscaled for the model (masks come back at the original size). API: `/segment`, "
                    "`/chat` (see *Use via API* below).", elem_id="footnote")

        shown = [chatbot, session, overlay, files, timings, status]
        ui = dict(api_visibility="private")
        send_args = dict(fn=send, inputs=[image, message, session, head, tokens, threshold],
                         outputs=[*shown, message], **ui)
        message.submit(**send_args)
        send_btn.click(**send_args)
        clear_btn.click(clear, None, [image, message, chatbot, session, overlay, files, timings, status],
                        concurrency_limit=None, **ui)
        image.change(new_image, [image, session], [chatbot, session, overlay, files, timings, status],
                     concurrency_limit=None, **ui)
        chatbot.clear(chat_cleared, session, [session, overlay, files, timings, status], concurrency_limit=None, **ui)
        head.change(head_changed, head, tokens, concurrency_limit=None, **ui)
        tokens.release(redo_tokens, [session, head, tokens, threshold], shown, **ui)
        threshold.release(rethreshold, [session, threshold], [overlay, files, timings], concurrency_limit=None, **ui)

        with gr.Column(visible=False):  # inputs and outputs of the API endpoints only
            a_image = upload_image(label="image")
            a_text = gr.Textbox(label="text")
            a_head = gr.Textbox(value="", label="head")
            a_history = gr.JSON(value=[], label="history")
            a_tokens = gr.Number(value=0, precision=0, label="keep_tokens")
            a_threshold = gr.Number(value=None, label="threshold")
            a_answer = gr.Textbox(label="answer")
            a_masks = gr.JSON(label="masks")
            a_details = gr.JSON(label="details")
            a_segment = gr.Button("segment")
            a_chat = gr.Button("chat")
        a_segment.click(segment, [a_image, a_text, a_head], [a_answer, a_masks], api_name="segment")
        a_chat.click(chat, [a_image, a_text, a_history, a_head, a_tokens, a_threshold],
                     [a_answer, a_masks, a_details], api_name="chat")
    demo.heads = heads  # for callers and tests
    return demo


# -- loading and launching ------------------------------------------------------------------------------------
def checkpoint_folders(root: str | Path | None = None) -> list[Path]:
    """Every ``checkpoints/*/`` folder with a config.json (one per head)."""
    root = Path(root) if root is not None else ROOT / "checkpoints"
    return sorted(p.parent for p in root.glob("*/config.json"))


def load_segmenters(spec: str | None = None, root: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Load the models that ``spec`` names (comma-separated folders or hub ids; default ``$MMSEG_MODEL``, else
    every folder under ``checkpoints/``) once -> ``{display name: Segmenter}``, STAMP first."""
    from mmseg import Segmenter

    spec = os.environ.get("MMSEG_MODEL", "") if spec is None else spec
    names = [s.strip() for s in spec.split(",") if s.strip()] or [str(p) for p in checkpoint_folders(root)]
    if not names:
        raise SystemExit("mmseg app: no model. Set MMSEG_MODEL to a checkpoint folder or hub id "
                         "(comma-separated for several), or put checkpoints under checkpoints/.")
    loaded = []
    for name in names:
        log.info("loading %s", name)
        seg = Segmenter.from_pretrained(name, **kwargs)
        loaded.append((Path(name).name, seg))
    loaded.sort(key=lambda item: head_sort_key(item[1].head_name))
    counts: dict[str, int] = {}
    for _, seg in loaded:
        counts[seg.head_name] = counts.get(seg.head_name, 0) + 1
    return {(seg.head_name if counts[seg.head_name] == 1 else f"{seg.head_name} ({folder})"): seg
            for folder, seg in loaded}


def launch(demo: gr.Blocks, **kwargs: Any):
    """Queue (``MMSEG_CONCURRENCY`` model calls at once) and launch with an upload limit. Server name and port
    come from Gradio's own ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` unless passed."""
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    options = dict(max_file_size=MAX_FILE_SIZE, allowed_paths=[str(EXAMPLES)], show_error=True, css=CSS,
                   footer_links=["api"])
    options.update(kwargs)
    return demo.launch(**options)
