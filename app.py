"""Chat-and-segment web app (also the Hugging Face Space entry point).

    python app.py                                  # every checkpoints/*/ folder, one head each
    MMSEG_MODEL=path/or/hub-id[,another] python app.py
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app.py

Other settings: MMSEG_CONCURRENCY (model calls at once, default 2), MMSEG_MAX_FILE_SIZE (upload limit,
default 50mb), MMSEG_QUEUE_SIZE (default 64).
"""

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home; the app works offline

from ui import build_app, launch, load_segmenters  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes
    segmenters = load_segmenters()  # once; shared by every session and request
    logging.getLogger("mmseg.ui").info("heads: %s", ", ".join(segmenters))
    launch(build_app(segmenters))


if __name__ == "__main__":
    main()
