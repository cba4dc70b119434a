"""A real browser (Playwright driving Debian's Chromium): open the page, upload an image, type a query, wait for
the answer and the mask overlay, screenshot at desktop and at phone width (390 px). Requests to anything but
the app are blocked, so the page must work offline. Skips with the reason when no Chromium is installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from test_ui_support import EXAMPLES, SCREENSHOTS, examples, forced_segmenter, has_checkpoint, served

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install Debian's `chromium` (apt-get install chromium; "
                                                ".ci/run does) to run the browser test"),
]


@pytest.fixture(scope="module")
def app_url():
    from mmseg import Segmenter
    from ui import build_app

    # The trained checkpoint when it exists (screenshots of a real answer), else a tiny model forced to
    # answer with a mask.
    seg = Segmenter.from_pretrained(EXAMPLES.parent / "checkpoints" / "synthref-stamp", device="cpu") \
        if has_checkpoint() else forced_segmenter()
    with served(build_app(seg)) as url:
        yield url


def _chat_and_capture(browser, url: str, viewport: dict, shot: Path, more: bool = False, **context) -> dict:
    ctx = browser.new_context(viewport=viewport, **context)
    page = ctx.new_page()
    outside: list[str] = []

    def only_the_app(route):
        if route.request.url.startswith((url, "data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_app)
    try:
        page.goto(url)
        page.wait_for_selector("#message textarea", timeout=30_000)
        first = examples()[0]
        page.fill("#message textarea", f"Please segment {first['query']}.")
        if more:  # an error is shown on the page, and the page keeps working
            page.click("#send")
            page.wait_for_function("document.querySelector('#status').innerText.includes('No image')",
                                   timeout=30_000)
        page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / first["file"]))
        page.wait_for_selector("#image img", timeout=30_000)
        page.click("#send")
        bot = page.locator('#chat [data-testid="bot"]').last
        bot.wait_for(timeout=60_000)
        page.wait_for_selector("#overlay img.base-image", timeout=30_000)
        answer = bot.inner_text()
        if "[mask" in answer:
            page.wait_for_selector("#overlay img.mask", timeout=30_000)
        page.wait_for_function("[...document.querySelectorAll('#overlay img')].every(i => i.complete)")
        page.wait_for_selector("#timings strong", timeout=30_000)
        state = {}
        if more:  # a follow-up keeps the image and the history; an empty message is refused
            page.click("#send")
            page.wait_for_function("document.querySelector('#status').innerText.includes('empty')", timeout=30_000)
            page.fill("#message textarea", "And the other one?")
            page.click("#send")
            page.wait_for_function(
                "document.querySelectorAll('#chat [data-testid=\"bot\"]').length >= 2", timeout=60_000)
            state["bubbles"] = page.locator('#chat [data-testid="user"]').count()
        state.update({
            "answer": answer,
            "masks": page.locator("#overlay img.mask").count(),
            "legend": page.locator("#overlay .legend-item").all_inner_texts(),
            "downloads": page.locator("#downloads").inner_text(),
            "overflow_px": page.evaluate("document.documentElement.scrollWidth - window.innerWidth"),
            "outside": outside,
        })
        for _ in range(5):  # dismiss the error toasts so that the screenshot shows the page
            close = page.locator('[data-testid="toast-close"]')
            if not close.count():
                break
            close.first.click()
            page.wait_for_timeout(300)
        page.screenshot(path=str(shot), full_page=True)
        if more:  # Clear resets the conversation and the overlay
            page.click("#clear")
            page.wait_for_function("document.querySelectorAll('#chat [data-testid=\"bot\"]').length == 0",
                                   timeout=30_000)
            state["after_clear_masks"] = page.locator("#overlay img.mask").count()
        return state
    finally:
        ctx.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_browser_chat_upload_answer_overlay_desktop_and_phone(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            desktop = _chat_and_capture(browser, app_url, {"width": 1280, "height": 900}, tmp_path / "desktop.png",
                                        more=True)
            phone = _chat_and_capture(browser, app_url, {"width": 390, "height": 844}, tmp_path / "phone.png",
                                      device_scale_factor=2, is_mobile=True, has_touch=True)
        finally:
            browser.close()
    for name in ("desktop.png", "phone.png"):
        shutil.copy(tmp_path / name, SCREENSHOTS / name)
    print(f"screenshots: {tmp_path} (copied to {SCREENSHOTS})\ndesktop: {desktop}\nphone: {phone}")
    for state in (desktop, phone):
        assert state["answer"].strip(), "empty answer bubble"
        if "[mask" in state["answer"]:
            assert state["masks"] >= 1 and state["legend"], state
            assert "mask_1" in state["downloads"] and "masks_coco_rle" in state["downloads"]
    assert desktop["bubbles"] == 2 and desktop["after_clear_masks"] == 0, desktop
    if not has_checkpoint():  # the forced tiny model always answers with one mask
        assert desktop["masks"] == 1 and phone["masks"] == 1
    assert phone["overflow_px"] <= 1, f"the page scrolls sideways at 390 px by {phone['overflow_px']} px"
    assert not desktop["outside"] and not phone["outside"], f"the page fetched outside the app: {desktop['outside']}"
