import random

import numpy as np
import pytest
import torch

from mmseg.data.collate import Collator, ExamplePool
from mmseg.data.prompts import NO_TARGET_ANSWER
from mmseg.data.refer import ReferDataset, read_qa
from tiny import tiny_model


@pytest.fixture(scope="module")
def pool(synthref_root):
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    return ExamplePool(ds, read_qa(synthref_root, "train"), ds.image_root)


def test_curriculum_draws_only_allowed_types(pool):
    rng = random.Random(0)
    for _ in range(50):
        ex = pool.draw(rng, qa_fraction=0.0, types=["attribute"])
        assert ex.mask is not None  # attribute expressions always have a target
    with pytest.raises(ValueError, match="match no samples"):
        pool.draw(rng, 0.0, ["nonsense"])


def test_no_target_fraction_sets_the_share_of_refusals(pool):
    def share(fraction, types=None, n=600):
        rng = random.Random(3)
        draws = [pool.draw(rng, 0.0, types, no_target_fraction=fraction) for _ in range(n)]
        return sum(ex.answer == NO_TARGET_ANSWER for ex in draws) / n

    natural = share(None)
    assert 0.0 < natural < 0.3
    assert abs(share(0.5) - 0.5) < 0.08 and share(0.0) == 0.0
    assert share(0.5, types=["attribute"]) == 0.0  # the curriculum still rules: no no-target phase, no refusals
    # None leaves the draw exactly as before (same samples from the same seed)
    a, b = random.Random(9), random.Random(9)
    assert [pool.draw(a, 0.2).answer for _ in range(40)] == [pool.draw(b, 0.2, None, 0.0, None).answer for _ in range(40)]


def test_type_weights_set_each_types_share(pool, monkeypatch):
    type_of = {i: t for t, indices in pool.by_type.items() for i in indices}
    drawn: list[str] = []
    real = pool.segmentation
    monkeypatch.setattr(pool, "segmentation", lambda index, rng: drawn.append(type_of[index]) or real(index, rng))

    def shares(weights, types=None, n=800):
        drawn.clear()
        rng = random.Random(5)
        for _ in range(n):
            pool.draw(rng, 0.0, types, type_weights=weights)
        return {t: drawn.count(t) / n for t in pool.by_type}

    sizes = {t: len(v) for t, v in pool.by_type.items()}
    weights = {"relational": 3.0, "attribute": 0.0}
    expected = {t: sizes[t] * weights.get(t, 1.0) for t in sizes}
    got = shares(weights)
    for t in sizes:
        assert abs(got[t] - expected[t] / sum(expected.values())) < 0.06, (t, got)
    assert got["attribute"] == 0.0
    assert set(shares({"relational": 5.0}, types=["attribute"]).items()) >= {("attribute", 1.0)}  # curriculum rules
    with pytest.raises(ValueError, match="leave no referring type"):
        pool.draw(random.Random(0), 0.0, ["attribute"], type_weights={"attribute": 0.0})


def test_collated_batch_matches_the_model_contract(pool):
    model, proc = tiny_model()
    rng = random.Random(1)
    batch = Collator(proc, model.head)([pool.draw(rng, 0.3) for _ in range(6)])
    b, t = batch["input_ids"].shape
    assert batch["pixel_values"].shape == (b, 3, 64, 64) and batch["mask_targets"].shape == (b, 64, 64)
    for i in range(b):
        seg = int(batch["seg_positions"][i])
        if seg >= 0:
            assert batch["input_ids"][i, seg] == proc.seg_token_id and batch["mask_targets"][i].sum() > 0
            assert batch["labels"][i, seg] == proc.seg_token_id  # <seg> is a trained answer token
        assert (batch["input_ids"][i] == proc.image_token_id).sum() == proc.num_patches
    with torch.no_grad():
        assert torch.isfinite(model(batch)["loss"])


def test_region_phrase_reads_thirds_of_the_image():
    from mmseg.data.prompts import region_phrase

    mask = np.zeros((90, 120), dtype=bool)
    assert region_phrase(mask) is None
    mask[5:15, 5:15] = True
    assert region_phrase(mask) == "at the top left"
    mask[:] = False
    mask[40:50, 50:70] = True
    assert region_phrase(mask) == "in the center"
    mask[:] = False
    mask[80:, 100:] = True  # the last row/column stays in range
    assert region_phrase(mask) == "at the bottom right"


def test_answers_name_the_target_and_its_colour(pool):
    """SynthRef answers say which object they mean before <seg>: its colour (from the annotation's attributes),
    its kind (the category) and where it is; no-target answers refuse; the option turns descriptions off."""
    from mmseg.data.prompts import NO_TARGET_ANSWER, TARGET_ANSWER, region_phrase

    rng = random.Random(0)
    seen_target = seen_none = False
    for index in range(0, len(pool.refer), max(1, len(pool.refer) // 40)):
        sample = pool.refer[index]
        answer = pool.segmentation(index, rng).answer
        if not sample.has_target:
            assert answer == NO_TARGET_ANSWER
            seen_none = True
            continue
        color = sample.attributes["color"]
        assert answer == f"Sure, the {color} {sample.category} {region_phrase(sample.mask)} <seg>."
        seen_target = True
    assert seen_target and seen_none
    plain = ExamplePool(pool.refer, [], pool.image_root, describe_targets=False)
    index = next(i for i in range(len(pool.refer)) if pool.refer[i].has_target)
    assert plain.segmentation(index, rng).answer == TARGET_ANSWER


def test_description_without_colour_uses_the_category_alone():
    """Real refCOCO annotations carry no colour: the answer names the category ("the person on the right")."""
    from types import SimpleNamespace

    from mmseg.data.prompts import target_description

    mask = np.zeros((30, 30), dtype=bool)
    mask[10:20, 22:29] = True
    sample = SimpleNamespace(has_target=True, category="person", attributes=None, mask=mask)
    assert target_description(sample) == "the person on the right"
    assert target_description(SimpleNamespace(has_target=False, category=None, attributes=None, mask=mask)) is None


def test_relational_answers_say_where_the_anchor_is_before_naming_the_target(pool):
    """With reason_relations, a relational request is answered in two written steps: the anchor's place, then the
    object in the relation to it (or that there is none); every other request keeps its one-step answer."""
    from mmseg.data.prompts import region_phrase, target_description
    from mmseg.data.synthetic import split_relation

    reasoning = ExamplePool(pool.refer, [], pool.image_root, reason_relations=True)
    rng = random.Random(0)
    seen = {True: 0, False: 0}
    for index in range(len(pool.refer)):
        sample = pool.refer[index]
        answer = reasoning.segmentation(index, rng).answer
        parts = split_relation(sample.sentence)
        if parts is None:
            assert answer == pool.segmentation(index, rng).answer
            continue
        want = parts.anchor_desc
        anchor = [m for m, labels in pool.refer.image_objects(sample.image_id)
                  if want.color in (None, labels["color"]) and want.kind in (None, labels["kind"])]
        assert len(anchor) == 1  # SynthRef names its anchors uniquely
        assert answer.startswith(f"The {parts.anchor} is {region_phrase(anchor[0])}, and ")
        if sample.has_target:
            assert answer.endswith(f" the {parts.subject} {parts.relation} it is {target_description(sample)} <seg>.")
        else:
            subject = "object" if parts.subject == "one" else parts.subject
            assert answer.endswith(f" there is no {subject} {parts.relation} it.") and "<seg>" not in answer
        seen[sample.has_target] += 1
    assert seen[True] and seen[False]
    # without descriptions there is nothing to reason in: the plain answer
    plain = ExamplePool(pool.refer, [], pool.image_root, describe_targets=False, reason_relations=True)
    index = next(i for i in range(len(pool.refer)) if split_relation(pool.refer[i].sentence) and pool.refer[i].has_target)
    assert plain.segmentation(index, rng).answer == "Sure, <seg>."


def test_split_relation_reads_the_request_words():
    from mmseg.data.synthetic import Desc, split_relation

    parts = split_relation("The star to the left of the red star.")
    assert (parts.subject, parts.relation, parts.anchor, parts.anchor_desc) == (
        "star", "to the left of", "red star", Desc("red", "star"))
    parts = split_relation("the green one next to the blue object")
    assert (parts.subject, parts.anchor, parts.anchor_desc) == ("green one", "blue object", Desc("blue", None))
    for other in ("the red circle", "the leftmost star", "the man on the left", ""):
        assert split_relation(other) is None


def test_object_listing_reads_every_object_in_reading_order(pool):
    """"Describe the objects" answers count the image's objects and list each with colour, kind and region, top
    row first, left to right; the draw mixes them in at ``list_fraction``."""
    from mmseg.data.prompts import LIST_TEMPLATES, list_objects_answer

    rng = random.Random(3)
    ex = pool.draw(rng, 0.0, list_fraction=1.0)
    assert ex.prompt in LIST_TEMPLATES and ex.mask is None
    assert ex.answer.startswith("There ") and ex.answer.endswith(".")
    a = np.zeros((90, 90), dtype=bool)
    a[5:20, 5:20] = True
    b = np.zeros((90, 90), dtype=bool)
    b[70:85, 60:85] = True
    c = np.zeros((90, 90), dtype=bool)
    c[40:50, 40:50] = True
    objects = [(b, {"kind": "star", "color": "orange"}), (a, {"kind": "circle", "color": "red"}), (c, {"kind": "square"})]
    assert list_objects_answer(objects) == ("There are 3 objects: a red circle at the top left, a square in the center "
                                            "and an orange star at the bottom right.")
    assert list_objects_answer(objects[1:2]) == "There is 1 object: a red circle at the top left."
    assert list_objects_answer([]) is None
    draws = [pool.draw(random.Random(i), 0.0, list_fraction=0.0).prompt for i in range(20)]
    assert not any(p in LIST_TEMPLATES for p in draws)  # off by default


def test_memoised_collation_gives_identical_batches(synthref_root):
    """The memo (decoded images, label maps, placed masks) changes speed only: batches equal the uncached ones,
    also the second time round when every input comes from the memo."""
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    pool = ExamplePool(ds, read_qa(synthref_root, "train"), ds.image_root, with_objects=True)
    model, proc = tiny_model()
    families = {"kind": ["circle", "square", "triangle", "star", "cross", "hexagon"], "color": ["red", "green", "blue"]}
    rng = random.Random(3)
    examples = [pool.draw(rng, 0.3) for _ in range(8)]
    plain = Collator(proc, model.head, patch_labels=families, focus=True)(examples)
    cached = Collator(proc, model.head, patch_labels=families, focus=True, cache_mb=64)
    first, second = cached(examples), cached(examples)
    assert cached.memo.hits > 0 and len(cached.memo) > 0
    for batch in (first, second):
        assert batch.keys() == plain.keys()
        for key in plain:
            assert batch[key].dtype == plain[key].dtype and torch.equal(batch[key], plain[key]), key


def test_budget_memo_stops_inserting_when_full():
    from mmseg.data.cache import BudgetMemo

    memo = BudgetMemo(budget_bytes=3 * 400)
    calls = []

    def make(i):
        calls.append(i)
        return torch.zeros(100, dtype=torch.float32) + i  # 400 bytes

    for i in range(5):
        assert float(memo.get(i, lambda: make(i))[0]) == i
    assert len(memo) == 3 and memo.used == 1200
    memo.get(0, lambda: make(0))
    memo.get(4, lambda: make(4))
    assert calls == [0, 1, 2, 3, 4, 4] and memo.hits == 1  # key 4 did not fit: made again
