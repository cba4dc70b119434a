"""The app on localhost through gradio_client: answers and masks, every bad input followed by a good request,
16 concurrent requests; app.py itself (offline start, MMSEG_MODEL, Gradio's port setting, the committed
checkpoint: first answer within 20 s of launch, IoU >= 0.5 on a SynthRef example)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from mmseg.masks import decode_rle, encode_rle
from test_ui_support import (
    EXAMPLES,
    ROOT,
    examples,
    forced_segmenter,
    free_port,
    iou,
    needs_checkpoint,
    served,
)

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

SYNTH = str(EXAMPLES / "synthref_0.png")


@pytest.fixture(scope="module")
def segmenter():
    return forced_segmenter()


@pytest.fixture(scope="module")
def client(segmenter):
    from ui import build_app

    with served(build_app(segmenter)) as url:
        yield Client(url, verbose=False)


def good(client, image=SYNTH):
    text, masks = client.predict(image=handle_file(image), text="Please segment cross.", api_name="/segment")
    size = Image.open(image).size
    assert text == "<seg>" and len(masks) == 1 and masks[0]["size"] == [size[1], size[0]]
    return masks


def test_segment_and_chat_endpoints(client, segmenter):
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/segment", "/chat"} <= set(info)
    assert [p["parameter_name"] for p in info["/segment"]["parameters"]] == ["image", "text", "head"]
    photo = str(EXAMPLES / "photos" / "coffee.jpg")
    masks = good(client, photo)  # head omitted = the first loaded head
    assert decode_rle(masks[0]).shape == (341, 512)
    assert masks == [encode_rle(m) for m in segmenter(photo, "Please segment cross.").masks]  # = the Segmenter
    text, masks, details = client.predict(image=handle_file(SYNTH), message="Please segment cross.",
                                          api_name="/chat")
    assert text == "<seg>" and details["head"] == "stamp" and "total_ms" in details["timings_ms"]
    history = details["history"]
    text2, masks2, details2 = client.predict(image=handle_file(SYNTH), message="and now the other one",
                                             history=history, head="stamp", threshold=0.9, api_name="/chat")
    assert len(details2["history"]) == 4 and details2["history"][2]["content"] == "and now the other one"
    assert decode_rle(masks2[0]).sum() <= decode_rle(masks[0]).sum()  # a higher threshold, a smaller mask


def test_every_bad_input_is_an_error_and_the_next_request_is_answered(client, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("just text")
    cases = [
        (dict(image=None, text="Please segment cross."), "No image"),
        (dict(image=handle_file(str(corrupt)), text="Please segment cross."), "not an image"),
        (dict(image=handle_file(str(not_image)), text="Please segment cross."), "not an image"),
        (dict(image=handle_file(SYNTH), text=""), "empty"),
        (dict(image=handle_file(SYNTH), text="   "), "empty"),
        (dict(image=handle_file(SYNTH), text="Please segment cross.", head="himtok"), "Unknown head"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(AppError, match=expected):
            client.predict(**kwargs, api_name="/segment")
        good(client)
    with pytest.raises(AppError, match="history"):
        client.predict(image=handle_file(SYNTH), message="hi", history=[{"role": "nobody"}], api_name="/chat")
    good(client)

    # over the upload limit (50 MB by default): refused before it is sent
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(51 * 2**20)  # sparse: no disk, no time
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(image=handle_file(str(huge)), text="Please segment cross.", api_name="/segment")
    good(client)

    # 20,000 characters: answered, cut to 2,000 with a note
    long = ("Please segment the red circle. " * 700)[:19_999] + "."
    text, masks, details = client.predict(image=handle_file(SYNTH), message=long, api_name="/chat")
    assert text == "<seg>" and any("20,000 characters; only the first 2,000" in n for n in details["notes"])
    good(client)

    # 10000 x 10000: downscaled for the model (noted), masks at the original size
    big = tmp_path / "big.png"
    canvas = Image.new("L", (10_000, 10_000), 40)
    canvas.paste(200, (2000, 2000, 6000, 6000))
    canvas.save(big, compress_level=1)
    del canvas
    text, masks, details = client.predict(image=handle_file(str(big)), message="Please segment the square.",
                                          api_name="/chat")
    assert masks[0]["size"] == [10_000, 10_000] and any("downscaled" in n for n in details["notes"])
    good(client)


def test_sixteen_concurrent_requests_are_all_answered(client):
    images = [str(EXAMPLES / f"synthref_{i % 4}.png") for i in range(16)]
    start = time.perf_counter()
    jobs = [client.submit(image=handle_file(im), text=f"Please segment cross {i}.", api_name="/segment")
            for i, im in enumerate(images)]
    results = [job.result(timeout=120) for job in jobs]
    elapsed = time.perf_counter() - start
    assert len(results) == 16 and all(text == "<seg>" and len(masks) == 1 for text, masks in results)
    print(f"16 concurrent /segment requests answered in {elapsed:.1f} s")


def _run_app(env_extra: dict, port: int, as_readme: bool = False):
    """``python app.py`` from the repo root. ``as_readme``: without the offline variables CI sets, as the
    README's command runs it (the app itself must not reach out)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), **env_extra}
    if as_readme:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GRADIO_ANALYTICS_ENABLED"):
            env.pop(name, None)
    if "MMSEG_MODEL" not in env_extra:
        env.pop("MMSEG_MODEL", None)  # the default: every folder under checkpoints/
    return subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _first_answer(proc, port: int, image: str, query: str, deadline_s: float):
    """Poll until the app answers /segment; returns (client, text, masks, seconds since launch)."""
    start = time.perf_counter()
    while time.perf_counter() - start < deadline_s:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.25)
            continue
        text, masks = client.predict(image=handle_file(image), text=query, api_name="/segment")
        return client, text, masks, time.perf_counter() - start
    proc.kill()
    pytest.fail(f"app.py did not answer within {deadline_s} s:\n{proc.stdout.read()[-3000:]}")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_app_py_loads_every_model_in_mmseg_model(tmp_path):
    """MMSEG_MODEL lists two checkpoint folders (comma-separated); the head selector gets both, offline."""
    for i, seed in enumerate((1, 2)):
        forced_segmenter(seed=seed).save_pretrained(tmp_path / f"m{i}")
    port = free_port()
    proc = _run_app({"MMSEG_MODEL": f"{tmp_path / 'm0'}, {tmp_path / 'm1'}"}, port, as_readme=True)
    try:
        client, text, masks, _ = _first_answer(proc, port, SYNTH, "Please segment cross.", 120)
        assert isinstance(text, str) and isinstance(masks, list)
        _, _, details = client.predict(image=handle_file(SYNTH), message="hello", head="stamp (m1)",
                                       api_name="/chat")
        assert details["head"] == "stamp (m1)"
    finally:
        _stop(proc)


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_checkpoint()
def test_app_py_first_answer_on_synthref_is_right_and_fast():
    """`python app.py` with no settings loads checkpoints/*, offline; the first answer on a SynthRef example
    arrives within 20 s of launch, every shipped example gets an answer through /segment, and a mask matches
    its known one (IoU >= 0.5; all four IoUs are printed)."""
    port = free_port()
    proc = _run_app({}, port, as_readme=True)
    try:
        shipped = examples()
        queries = [f"Please segment {ex['query']}." for ex in shipped]
        client, text, masks, seconds = _first_answer(proc, port, str(EXAMPLES / shipped[0]["file"]), queries[0], 120)
        print(f"first answer {seconds:.1f} s after launch: {text!r}")
        answers = [(text, masks)] + [
            client.predict(image=handle_file(str(EXAMPLES / ex["file"])), text=q, api_name="/segment")
            for ex, q in zip(shipped[1:], queries[1:])]
        scores = {}
        for ex, (t, m) in zip(shipped, answers):
            assert isinstance(t, str) and t.strip()
            scores[ex["file"]] = iou(decode_rle(m[0]), decode_rle(ex["mask"])) if m else 0.0
            if m:
                assert m[0]["size"] == ex["mask"]["size"]  # the original image size
        print("IoU per example:", {k: round(v, 3) for k, v in scores.items()})
        best = max(scores, key=scores.get)
        assert scores[best] >= 0.5, f"no shipped SynthRef example reaches IoU 0.5: {scores}"
        assert seconds < 20, f"the first answer took {seconds:.1f} s after launch"
    finally:
        _stop(proc)

