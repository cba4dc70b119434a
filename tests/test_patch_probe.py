"""The patch probe: dense colour/kind labels per patch from the annotations, a loss on the patch features."""

import random

import torch

from mmseg.data.collate import Collator, ExamplePool
from mmseg.data.refer import ReferDataset
from mmseg.modeling.builder import load_pretrained
from mmseg.modeling.patch_probe import IGNORE, _pool_labels
from tiny import tiny_model

FAMILIES = {"kind": ["circle", "square", "triangle", "star", "cross", "hexagon"],
            "color": ["red", "green", "blue", "yellow", "purple", "orange", "white"]}


def test_patch_labels_take_the_majority_class_background_and_unknown():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)  # a 2x2 grid of 2x2-pixel patches
    labels[0, 0:2, 0:2] = 3  # patch (0, 0): all class 3
    labels[0, 0, 2] = 2  # patch (0, 1): a quarter class 2 -> below 0.3 -> background
    labels[0, 2:4, 0:2] = torch.tensor([[1, 1], [2, 0]])  # patch (1, 0): class 1 covers half
    labels[0, 2:4, 2:4] = IGNORE  # patch (1, 1): unknown
    assert _pool_labels(labels, 4, (2, 2), min_cover=0.3).tolist() == [[3, 0, 1, IGNORE]]


def test_image_objects_carry_kind_and_colour(synthref_root):
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    sample = next(ds[i] for i in range(len(ds)) if ds[i].has_target)
    objects = ds.image_objects(sample.image_id)
    assert 2 <= len(objects) <= 6
    for mask, labels in objects:
        assert mask.shape == sample.mask.shape and mask.any()
        assert labels["kind"] in FAMILIES["kind"] and labels["color"] in FAMILIES["color"]
    # the target is one of them
    assert any((mask == sample.mask).all() for mask, _ in objects)


def test_probe_loss_trains_saves_and_reloads(synthref_root, tmp_path):
    """A model with a probe gets a finite ``patch_probe`` loss whose gradient reaches the vision tower; its
    families and weights round-trip through save_pretrained; a batch without labels trains without the term."""
    model, proc = tiny_model(model_options={"patch_labels": FAMILIES})
    model.train()
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    pool = ExamplePool(ds, [], ds.image_root, with_objects=True)
    rng = random.Random(0)
    batch = Collator(proc, model.head, patch_labels=model.config.patch_labels)([pool.draw(rng, 0.0) for _ in range(3)])
    assert batch["patch_labels"].shape == (3, 2, 64, 64)
    assert set(batch["patch_labels"].unique().tolist()) <= set(range(8)) | {IGNORE}
    losses = model(batch)
    assert torch.isfinite(losses["patch_probe"]) and float(losses["patch_probe"]) > 0
    losses["loss"].backward()
    assert model.vision.visual.conv1.weight.grad.abs().sum() > 0
    assert model.probe.heads["color"].weight.grad is not None

    model.eval().save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert loaded.config.patch_labels == FAMILIES
    torch.testing.assert_close(loaded.probe.heads["kind"].weight, model.probe.heads["kind"].weight)
    del batch["patch_labels"]
    assert "patch_probe" not in loaded(batch)


def test_examples_without_objects_are_ignored_not_background(synthref_root):
    model, proc = tiny_model(model_options={"patch_labels": FAMILIES})
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    pool = ExamplePool(ds, [], ds.image_root, with_objects=False)
    batch = Collator(proc, model.head, patch_labels=FAMILIES)([pool.draw(random.Random(0), 0.0)])
    assert bool((batch["patch_labels"] == IGNORE).all())
