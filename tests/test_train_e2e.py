"""End to end: SynthRef -> train a tiny model a few steps -> save -> reload -> predict; resume; two processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmseg.cli import main as cli_main
from mmseg.config import load_preset
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _preset(tmp_path: Path, **train) -> Path:
    config = tiny_config().to_dict()
    config["lm"].pop("hf_config"), config["vision"].pop("hf_config")
    base = {"batch_size": 4, "lr": 2e-3, "warmup_steps": 2, "max_steps": 6, "eval_every": 1000, "eval_samples": 4,
            "save_every": 3, "log_every": 1, "mixed_precision": "no", "vocab_size": 400}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"model": config, "train": {**base, **train}}))
    return path


@pytest.mark.slow
def test_train_save_reload_predict(synthref_root, tmp_path):
    from mmseg.predictor import Segmenter
    from mmseg.train import train

    out = tmp_path / "ckpt"
    summary = train(load_preset(_preset(tmp_path, max_steps=8)), synthref_root, out, progress=False)
    assert summary["step"] == 8 and "val_ciou" in summary
    history = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]  # it learns
    assert all(h["samples_per_s"] > 0 and 0 < h["peak_fraction"] for h in history if "loss" in h)
    assert (out / "curve.png").stat().st_size > 1000

    seg = Segmenter.from_pretrained(out)
    image = synthref_root / "images" / "synthref_val_000000.png"
    answer = seg(image, "Please segment the red circle.")
    assert isinstance(answer.text, str) and all(m.shape == (128, 128) and m.dtype == bool for m in answer.masks)

    prefix = tmp_path / "pred" / "demo"
    assert cli_main(["predict", "--model", str(out), "--image", str(image), "--query", "the red circle", "--out", str(prefix)]) == 0
    record = json.loads(Path(f"{prefix}_masks.json").read_text())
    assert record["text"] == answer.text
    from PIL import Image

    assert Image.open(f"{prefix}_mask.png").size == (128, 128)


@pytest.mark.slow
def test_resume_continues_where_it_stopped(synthref_root, tmp_path):
    from mmseg.train import train

    out = tmp_path / "ckpt"
    preset = load_preset(_preset(tmp_path, max_steps=6, save_every=3))
    train(preset, synthref_root, out, max_steps=3, progress=False)
    assert json.loads((out / "train_state" / "progress.json").read_text())["step"] == 3
    summary = train(preset, synthref_root, out, progress=False)  # same command again: resumes
    assert summary["step"] == 6
    steps = [json.loads(l)["step"] for l in (out / "history.jsonl").read_text().splitlines() if "loss" in l]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice


@pytest.mark.slow
def test_init_fine_tunes_from_a_checkpoint(synthref_root, tmp_path, capsys):
    """``mmseg train --init CKPT`` starts a new run from the checkpoint's weights (its first loss is the trained
    model's, not a fresh one's); a preset whose architecture differs stops with a clear message."""
    from mmseg.train import train

    preset = _preset(tmp_path, max_steps=8)
    base = tmp_path / "base"
    train(load_preset(preset), synthref_root, base, progress=False)
    fresh_first = json.loads((base / "history.jsonl").read_text().splitlines()[0])["loss"]
    tuned = tmp_path / "tuned"
    assert cli_main(["train", "--config", str(preset), "--data", str(synthref_root), "--out", str(tuned),
                     "--init", str(base), "--max-steps", "2", "--set", "train.lr=1e-4"]) == 0
    tuned_first = json.loads((tuned / "history.jsonl").read_text().splitlines()[0])["loss"]
    assert tuned_first < fresh_first
    assert (tuned / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()

    capsys.readouterr()
    code = cli_main(["train", "--config", str(preset), "--data", str(synthref_root), "--out", str(tmp_path / "x"),
                     "--init", str(base), "--set", "model.lm.intermediate_size=96"])
    assert code == 2 and "do not match the config" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_accelerate_run(synthref_root, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmseg", "train",
           "--config", str(_preset(tmp_path, batch_size=4, max_steps=4)), "--data", str(synthref_root), "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    assert json.loads((out / "train_state" / "progress.json").read_text())["step"] == 4


@pytest.mark.slow
def test_loader_workers_change_nothing_but_speed(synthref_root, tmp_path):
    """Batches are keyed by step, so training with DataLoader workers gives the very same losses."""
    from mmseg.train import train

    losses = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train(load_preset(_preset(tmp_path, max_steps=4, num_workers=workers, max_minutes=None)), synthref_root, out,
              progress=False)
        losses[workers] = [json.loads(l)["loss"] for l in (out / "history.jsonl").read_text().splitlines() if '"loss"' in l]
        assert multiprocessing.active_children() == []  # the loader's workers are gone once training returns
    assert len(losses[0]) == 4 and losses[0] == losses[2]


def test_train_clock_and_step_batches():
    from mmseg.train import StepBatches, TrainClock

    clock = TrainClock(wall_start=0.0, total_steps=10, deadline_s=None)
    assert clock.progress(5) == 0.5
    timed = TrainClock(wall_start=__import__("time").time() - 30, total_steps=1000, deadline_s=60)
    assert 0.49 < timed.progress(1) < 0.6  # the wall-time fraction leads
    batches = StepBatches(lambda step, progress: (step, progress), clock, first=7)
    assert len(batches) == 3 and batches[0] == (7, 0.7) and batches[2] == (9, 0.9)


def test_lr_schedule_warms_up_holds_then_decays():
    from mmseg.train import lr_at

    cosine = [lr_at(step, step / 100, 1.0, 10, 0.05) for step in range(101)]
    assert cosine[0] == 0.1 and cosine[9] == 1.0  # linear warm-up
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:])) and abs(cosine[100] - 0.05) < 1e-9
    wsd = [lr_at(step, step / 100, 1.0, 10, 0.05, decay_from=0.7) for step in range(101)]
    assert wsd[:10] == cosine[:10] and all(lr == 1.0 for lr in wsd[10:71])  # held at the peak until 70%
    assert abs(wsd[85] - 0.525) < 1e-9 and abs(wsd[100] - 0.05) < 1e-9  # half-way down the cosine, then the floor
    with pytest.raises(ValueError, match="decay_from"):
        lr_at(50, 0.5, 1.0, 10, 0.05, decay_from=1.0)
