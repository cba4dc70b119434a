"""The grounding probe: each QA item names the objects it is about; the LM's image positions learn the focus."""

import json
import random

import numpy as np
import pytest
import torch

from mmseg.data.collate import Collator, ExamplePool
from mmseg.data.refer import ReferDataset, read_qa
from mmseg.modeling.builder import load_pretrained
from tiny import tiny_model


def test_qa_items_name_the_objects_they_are_about(synthref_root):
    """Counting answers equal the number of named objects; a "no" existence answer names none; a colour answer is the
    colour of the one object named."""
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    instances = json.loads((synthref_root / "synthref" / "instances.json").read_text())
    colours = {int(a["id"]): a["attributes"]["color"] for a in instances["annotations"]}
    qa = read_qa(synthref_root, "train")
    assert all("ann_ids" in q for q in qa)
    for q in qa:
        if q["question"].startswith("how many"):
            assert int(q["answer"]) == len(q["ann_ids"])
        if q["answer"] == "no":
            assert q["ann_ids"] == []
        if q["answer"] == "yes" or q["question"].startswith(("what col", "is the ")):
            assert len(q["ann_ids"]) >= 1
        union = ds.union_mask(q["image_id"], q["ann_ids"])
        assert union.dtype == bool and union.any() == bool(q["ann_ids"])
    asked = [q for q in qa if q["question"].startswith("what col")]
    assert asked and all(colours[q["ann_ids"][0]] == q["answer"] for q in asked)


def test_union_mask_of_a_foreign_annotation_is_a_clear_error(synthref_root):
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    qa = read_qa(synthref_root, "train")
    a, b = qa[0], next(q for q in qa if q["image_id"] != qa[0]["image_id"] and q["ann_ids"])
    with pytest.raises(KeyError, match="not an annotation of image"):
        ds.union_mask(a["image_id"], b["ann_ids"])


def _model_and_batch(synthref_root, **options):
    model, proc = tiny_model(model_options={"image_position": "after", "ground_layer": 1, **options})
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    pool = ExamplePool(ds, read_qa(synthref_root, "train"), ds.image_root)
    rng = random.Random(0)
    examples = [pool.draw(rng, 0.5) for _ in range(8)] + [pool.listing(rng)]
    return model, proc, Collator(proc, model.head, focus=True)(examples), examples


def test_collator_places_each_examples_focus(synthref_root):
    model, proc, batch, examples = _model_and_batch(synthref_root)
    assert batch["focus_targets"].shape == (9, 64, 64) and batch["focus_valid"].all()
    for ex, target in zip(examples, batch["focus_targets"]):
        assert bool(target.any()) == bool(ex.focus.any())
    # a referring example's focus is its mask target
    ref = [i for i, ex in enumerate(examples) if ex.mask is not None]
    assert ref and all(torch.equal(batch["focus_targets"][i], batch["mask_targets"][i]) for i in ref)


def test_grounding_loss_trains_the_layers_below_it_only_and_round_trips(synthref_root, tmp_path):
    model, proc, batch, _ = _model_and_batch(synthref_root)
    model.train()
    losses = model(batch)
    assert torch.isfinite(losses["grounding"]) and float(losses["grounding"].detach()) > 0
    losses["grounding"].backward()
    layers = model.lm.get_decoder().layers
    assert layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # layer 1 produces the probed states
    assert layers[1].self_attn.q_proj.weight.grad is None  # layer 2 sits above the probe
    assert model.vision.visual.conv1.weight.grad.abs().sum() > 0

    # rows of unknown focus are left out; none known -> zero loss
    batch["focus_valid"][:] = False
    assert float(model(batch)["grounding"]) == 0.0

    model.eval().save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert loaded.config.ground_layer == 1
    torch.testing.assert_close(loaded.grounder.score.weight, model.grounder.score.weight)


def test_probe_learns_where_the_focus_is():
    """On a toy batch the probe's logits move toward the target cells."""
    model, proc = tiny_model(model_options={"image_position": "after", "ground_layer": 2})
    ids, labels = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    batch = {
        "input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "labels": torch.tensor([labels]), "pixel_values": torch.randn(1, 3, 64, 64),
        "mask_targets": torch.zeros(1, 64, 64), "seg_positions": torch.tensor([ids.index(proc.seg_token_id)]),
        "focus_targets": torch.zeros(1, 64, 64), "focus_valid": torch.tensor([True]),
    }
    batch["focus_targets"][0, :32, :32] = 1  # the top-left quarter: cells (0..1, 0..1) of the 4x4 prefix grid
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(batch)["grounding"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        embeds, _ = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        rows = torch.ones(1, 1, len(ids), len(ids), dtype=torch.bool).tril()
        model.run_decoder(embeds, rows, torch.arange(len(ids))[None], image_positions=batch["input_ids"] == proc.image_token_id)
        logits = model.grounder.last_logits
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:2, :2] = True
    assert logits[0][inside].min() > logits[0][~inside].max()


@pytest.mark.parametrize("options, message", [({"ground_layer": 5}, "ground_layer must be in 1..2"),
                                              ({"ground_layer": 1, "image_position": "before"}, "image_position")])
def test_bad_grounding_config_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(model_options=options)


def _gate_model(seed=0, **options):
    return tiny_model(seed=seed, model_options={"image_position": "after", "ground_layer": 1, "ground_gate": True,
                                                **options})


@pytest.mark.parametrize("presence", [False, True])
def test_a_new_gate_changes_nothing_and_a_trained_one_acts_the_same_cached_or_not(synthref_root, presence):
    """focus starts at zero: same losses as the model without a gate. With focus set, greedy decoding through the KV
    cache equals recomputing the whole sequence (the gate runs on the prompt pass, never on later tokens), and the
    training forward sees the same gated prefix as generation."""
    from mmseg.generation import generate

    gated, proc = _gate_model(seed=3, ground_presence=presence)
    plain, _ = tiny_model(seed=3, model_options={"image_position": "after"})
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("grounder.")})
    ids, labels = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.tensor([labels]), "pixel_values": torch.randn(1, 3, 64, 64),
             "mask_targets": torch.zeros(1, 64, 64), "seg_positions": torch.tensor([ids.index(proc.seg_token_id)])}
    with torch.no_grad():
        torch.testing.assert_close(gated(batch)["text_ce"], plain(batch)["text_ce"])
        gated.grounder.focus.normal_(0, 3.0)
        if presence:
            gated.grounder.presence.normal_(0, 3.0)
        assert not torch.allclose(gated(batch)["text_ce"], plain(batch)["text_ce"])

    prompt, _ = proc.encode_chat([{"role": "user", "content": "the red circle"}])
    pixels = batch["pixel_values"]
    out = generate(gated, [prompt], pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                   mask_token_id=proc.seg_token_id, max_new_tokens=5)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(len(out.tokens[0])):
            input_ids = torch.tensor([sequence])
            embeds, _ = gated.embed_inputs(input_ids, pixels)
            n = len(sequence)
            hidden = gated.run_decoder(embeds, torch.ones(1, 1, n, n, dtype=torch.bool).tril(), torch.arange(n)[None],
                                       image_positions=input_ids == proc.image_token_id)
            sequence.append(int(gated.lm.get_output_embeddings()(hidden[:, -1]).argmax(-1)))
    assert sequence[len(prompt):] == out.tokens[0]


def test_gate_trains_from_the_focus_and_round_trips(synthref_root, tmp_path):
    model, proc, batch, _ = _model_and_batch(synthref_root, ground_gate=True)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        losses = model(batch)
        first = first if first is not None else float(losses["grounding"].detach())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert float(losses["grounding"].detach()) < first
    assert model.grounder.focus.abs().sum() > 0  # the text loss trained the written-back vector
    model.eval().save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["loss"], model(batch)["loss"])


def test_focus_cells_mark_covered_cells_and_a_small_objects_best_cell():
    from mmseg.modeling.grounding import focus_cells

    focus = torch.zeros(2, 8, 8)
    focus[0, :4, :4] = 1  # fills cell (0, 0) of a 2x2 grid
    focus[0, 4, 4] = 1  # 1/16 of cell (1, 1): below 0.1 and below half the best cell -> not marked
    focus[1, 7, 7] = 1  # a one-pixel object: its only cell is marked
    cells = focus_cells(focus, (2, 2))
    assert cells[0].tolist() == [[1, 0], [0, 0]] and cells[1].tolist() == [[0, 0], [0, 1]]
    assert focus_cells(torch.zeros(1, 8, 8), (2, 2)).sum() == 0


def test_presence_writes_the_best_cells_evidence_right_after_the_image_only():
    from mmseg.modeling.grounding import GroundingGate

    torch.manual_seed(0)
    gate = GroundingGate(16, layer=1, presence=True)
    with torch.no_grad():
        gate.presence.normal_()
    hidden = torch.randn(3, 10, 16)
    image = torch.zeros(3, 10, dtype=torch.bool)
    image[0, 2:6] = True  # 2x2 grid; the position after it is 6
    image[1, 4:8] = True  # after: 8
    image[2, 6:10] = True  # the image ends the sequence: nothing after it to write to
    out = gate.apply(hidden, image, (2, 2))
    changed = (out - hidden).abs().sum(-1) > 0
    expected = torch.zeros(3, 10, dtype=torch.bool)
    expected[0, 6] = expected[1, 8] = True
    assert torch.equal(changed, expected)  # focus is still zero: only the presence slot moved
    p = gate.presence_probability()
    for row, pos in ((0, 6), (1, 8)):
        want = hidden[row, pos] + p[row] * gate.presence[1] + (1 - p[row]) * gate.presence[0]
        torch.testing.assert_close(out[row, pos], want)
    assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())


def test_presence_without_a_gate_is_a_clear_error():
    with pytest.raises(ValueError, match="ground_presence needs ground_gate"):
        tiny_model(model_options={"image_position": "after", "ground_layer": 1, "ground_presence": True})
