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


def test_probe_reads_features_at_any_scale_and_scores_object_patches():
    """The probe normalises its input: an LM trained from scratch starts with tiny embeddings (and projected
    features to match), which would otherwise keep the probe's logits flat for thousands of steps."""
    from mmseg.modeling.patch_probe import PatchProbe

    torch.manual_seed(0)
    probe = PatchProbe(8, {"kind": ["a", "b"]})
    features = torch.randn(2, 4, 8)
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)  # 2x2 grid of 2x2-pixel patches
    labels[:, 0, :2, :2] = 1
    labels[1, 0, 2:, 2:] = 2
    torch.testing.assert_close(probe.loss(features * 0.1, labels, (2, 2)), probe.loss(features, labels, (2, 2)),
                               rtol=2e-3, atol=0)
    correct, total = probe.object_accuracy(features, labels, (2, 2))["kind"]
    assert total == 3 and 0 <= correct <= 3  # object patches only: (0,0) in both images, (1,1) in the second
    with torch.no_grad():  # a probe that always answers "a" is right on exactly the two class-1 patches
        probe.heads["kind"].weight.zero_()
        probe.heads["kind"].bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    assert probe.object_accuracy(features, labels, (2, 2))["kind"] == (2, 3)


def test_vision_grad_scale_scales_what_lm_and_head_send_to_the_tower_not_the_probe(synthref_root):
    """``vision_grad_scale = 0``: the tower learns from the probe alone, and the forward pass is unchanged."""
    model, proc = tiny_model(model_options={"patch_labels": FAMILIES})
    model.train()
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    pool = ExamplePool(ds, [], ds.image_root, with_objects=True)
    batch = Collator(proc, model.head, patch_labels=FAMILIES)([pool.draw(random.Random(1), 0.0) for _ in range(3)])

    def tower_grad(scale: float, only_probe: bool = False):
        model.zero_grad()
        model.vision_grad_scale = scale
        losses = model(batch)
        (losses["patch_probe"] if only_probe else losses["loss"]).backward()
        return losses, model.vision.visual.conv1.weight.grad.clone()

    full, g_full = tower_grad(1.0)
    cut, g_cut = tower_grad(0.0)
    _, g_probe = tower_grad(1.0, only_probe=True)
    for key in full:
        torch.testing.assert_close(full[key], cut[key])
    torch.testing.assert_close(g_cut, g_probe)
    assert not torch.allclose(g_full, g_probe)


def test_size_family_is_derived_from_each_object_mask(synthref_root, tmp_path):
    """``patch_size_bins`` adds a "size" family whose labels come from the masks alone (any dataset): each object's
    patches get the bin of sqrt(area / image area); it trains, reloads, and bad bins are clear errors."""
    import numpy as np
    import pytest

    from mmseg.imageio import load_image
    from mmseg.modeling.patch_probe import probe_families, size_class

    bins = [0.08, 0.1, 0.13]
    square = np.zeros((100, 100), dtype=bool)
    square[:9, :9] = True  # radius 0.09
    assert size_class(square, bins) == "r<0.1" and size_class(np.ones((4, 4), bool), bins) == "r>=0.13"
    with pytest.raises(ValueError, match="positive and increasing"):
        probe_families(FAMILIES, [0.1, 0.1])
    with pytest.raises(ValueError, match='already has a "size" family'):
        probe_families({**FAMILIES, "size": ["s"]}, bins)

    model, proc = tiny_model(model_options={"patch_labels": FAMILIES, "patch_size_bins": bins})
    assert list(model.probe.families) == ["kind", "color", "size"] and len(model.probe.families["size"]) == 4
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    pool = ExamplePool(ds, [], ds.image_root, with_objects=True)
    examples = [pool.draw(random.Random(i), 0.0) for i in range(3)]
    batch = Collator(proc, model.head, patch_labels=model.probe.families, size_bins=bins)(examples)
    for example, labels in zip(examples, batch["patch_labels"]):
        for mask, _ in example.objects:  # every object's pixels carry its own size class (unless occluded)
            expected = 1 + model.probe.families["size"].index(size_class(mask, bins))
            box = proc.preprocess_image(load_image(example.image_path))[1]
            placed = proc.transform.mask_to_input(mask, box) > 0.5
            assert float((labels[2][placed] == expected).float().mean()) > 0.5
        assert set(labels[2].unique().tolist()) <= set(range(5))
    model.train()
    losses = model(batch)
    assert torch.isfinite(losses["patch_probe"])
    model.eval().save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert loaded.probe.families == model.probe.families
    for families, given in ((FAMILIES, bins), (model.probe.families, ())):  # one without the other
        with pytest.raises(ValueError, match='"size" family and size_bins go together'):
            Collator(proc, model.head, patch_labels=families, size_bins=given)
    with pytest.raises(ValueError, match="first 6 significant digits"):
        probe_families(FAMILIES, [0.1, 0.1000001])
