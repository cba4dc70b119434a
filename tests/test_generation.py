import torch
import torch.nn.functional as F

from mmseg.generation import generate, start_session
from mmseg.modeling.model import causal_text_attention
from tiny import tiny_model


def _prompt(proc, text, answer=None):
    ids, _ = proc.encode_chat([{"role": "user", "content": text}], answer)
    if answer is not None:
        ids = ids[: ids.index(proc.seg_token_id) + 1]  # the answer up to and including <seg>
    return ids


def _gen(model, proc, prompts, pixels):
    return generate(model, prompts, pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                    mask_token_id=proc.seg_token_id, max_new_tokens=6)


def test_batched_generation_equals_one_at_a_time():
    model, proc = tiny_model(seed=1)
    prompts = [_prompt(proc, "the red circle left of the blue square"), _prompt(proc, "how many?")]
    pixels = torch.randn(2, 3, 64, 64)
    both = _gen(model, proc, prompts, pixels)
    for i in range(2):
        one = _gen(model, proc, [prompts[i]], pixels[i : i + 1])
        assert both.tokens[i] == one.tokens[0]


def test_cached_greedy_equals_recomputing_the_whole_sequence():
    model, proc = tiny_model(seed=2)
    prompt = _prompt(proc, "the red circle")
    pixels = torch.randn(1, 3, 64, 64)
    out = _gen(model, proc, [prompt], pixels)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(out.tokens[0])):
            embeds, _ = model.embed_inputs(torch.tensor([ids]), pixels)
            hidden = model.decoder(inputs_embeds=embeds).last_hidden_state
            ids.append(int(model.lm.get_output_embeddings()(hidden[:, -1]).argmax(-1)))
    assert ids[len(prompt):] == out.tokens[0]


def _stamp_masks_from_cache(model, proc, prompts, pixels):
    with torch.no_grad():
        session, hidden = start_session(model, prompts, pixels, pad_token_id=proc.pad_token_id)
        width = max(map(len, prompts))
        session.mask_points = [[width - 1] for _ in prompts]  # <seg> is each prompt's last token (left padded)
        session.point_hidden = [[hidden[b, -1]] for b in range(len(prompts))]
        length = session.cache_length
        masks = model.head.decode(session)
        assert session.cache_length == length  # queries were cropped back out of the cache
    return [m[0].logits for m in masks]


def test_stamp_cached_mask_pass_equals_training_forward_and_is_batch_invariant():
    model, proc = tiny_model(seed=3)
    prompts = [_prompt(proc, "the red circle", "Sure, <seg>."), _prompt(proc, "a much longer query about the blue star", "Sure, <seg>.")]
    pixels = torch.randn(2, 3, 64, 64)
    cached = _stamp_masks_from_cache(model, proc, prompts, pixels)
    for i, prompt in enumerate(prompts):
        single = _stamp_masks_from_cache(model, proc, [prompt], pixels[i : i + 1])[0]
        torch.testing.assert_close(cached[i], single, atol=1e-4, rtol=1e-4)
        # the training path: whole sequence + queries in one forward with the 4D mask
        ids = torch.tensor([prompt])
        batch = {"attention_mask": torch.ones_like(ids), "seg_positions": torch.tensor([len(prompt) - 1])}
        with torch.no_grad():
            embeds, feats = model.embed_inputs(ids, pixels[i : i + 1])
            extra = model.head.extra_inputs(batch, feats)
            rows = torch.cat([F.pad(causal_text_attention(batch["attention_mask"]), (0, extra.embeds.shape[1])), extra.attention], 1)
            positions = torch.cat([torch.arange(len(prompt))[None], extra.position_ids], 1)
            hidden = model.decoder(inputs_embeds=torch.cat([embeds, extra.embeds], 1), attention_mask=rows[:, None],
                                   position_ids=positions).last_hidden_state
            full = model.head.mask_logits(hidden[:, len(prompt):], pixels[i : i + 1], hidden[:, len(prompt) - 1])[0]
        torch.testing.assert_close(cached[i], full, atol=1e-4, rtol=1e-4)


def test_no_mask_point_means_no_mask():
    model, proc = tiny_model(seed=4)
    out = _gen(model, proc, [_prompt(proc, "hello")], torch.randn(1, 3, 64, 64))
    if proc.seg_token_id not in out.tokens[0]:
        assert out.masks == [[]]
    assert set(out.timings) == {"vision_ms", "prefill_ms", "text_ms", "mask_ms"}


def test_replace_last_overwrites_one_cache_slot_in_place():
    """The shaper hook's primitive: re-running the last position replaces its KV entries, length unchanged."""
    model, proc = tiny_model(seed=6)
    prompt = _prompt(proc, "the red circle")
    pixels = torch.randn(1, 3, 64, 64)
    embed = model.lm.get_input_embeddings()
    tokens = torch.tensor([[7], [9]])
    with torch.no_grad():
        session, _ = start_session(model, [prompt], pixels, pad_token_id=proc.pad_token_id)
        pos = session.cache_positions[:, -1:] + 1
        first = session.feed(embed(tokens[0])[None], pos, torch.ones(1, 1, dtype=torch.bool))
        length = session.cache_length
        same = session.replace_last(embed(tokens[0])[None])
        torch.testing.assert_close(same, first, atol=1e-5, rtol=1e-4)
        shifted = embed(tokens[0])[None] + 0.5  # a control vector added to the token's input embedding
        steered = session.replace_last(shifted)
        assert session.cache_length == length and not torch.allclose(steered, first)
        after = session.feed(embed(tokens[1])[None], pos + 1, torch.ones(1, 1, dtype=torch.bool))
        # the next token sees the REPLACED entries: same as recomputing the whole sequence with the shifted input
        embeds, _ = model.embed_inputs(torch.tensor([prompt]), pixels)
        full = torch.cat([embeds, shifted, embed(tokens[1])[None]], 1)
        hidden = model.decoder(inputs_embeds=full).last_hidden_state
    torch.testing.assert_close(after[:, -1], hidden[:, -1], atol=1e-4, rtol=1e-4)


def test_after_step_sees_every_fed_token_and_the_head_picks_the_mask_point(monkeypatch):
    model, proc = tiny_model(seed=7)
    calls = []

    def after_step(session, hidden, chosen):
        calls.append(chosen.clone())
        return hidden

    monkeypatch.setattr(model.head, "after_step", after_step)
    from tiny import force_answer

    answer = proc.encode_model_text("Sure, <seg>.") + [proc.eos_token_id]
    monkeypatch.setattr(model.head, "constrain", force_answer(answer))
    out = generate(model, [_prompt(proc, "the red circle")], torch.randn(1, 3, 64, 64), eos_token_id=proc.eos_token_id,
                   pad_token_id=proc.pad_token_id, max_new_tokens=10)  # no mask_token_id: the head says <seg>
    assert out.tokens[0] == answer[:-1] and len(out.masks[0]) == 1
    assert [int(c) for c in calls] == answer[:-1]  # every fed token; eos ends the loop unfed
    assert out.text_tokens == out.tokens


def _bidirectional(seed, **options):
    return tiny_model(seed=seed, model_options={"image_attention": "bidirectional", "image_position": "after", **options})


def test_bidirectional_image_cells_see_later_cells_and_text_stays_causal():
    model, proc = _bidirectional(seed=7)
    causal, _ = tiny_model(seed=7, model_options={"image_position": "after"})
    causal.load_state_dict(model.state_dict())
    ids = torch.tensor([_prompt(proc, "the red circle")])
    image = (ids == model.image_token_id)[0].nonzero()[:, 0]
    first, last = int(image[0]), int(image[-1])
    with torch.no_grad():
        features = model.image_features(torch.randn(1, 3, 64, 64))
    changed = features.clone()
    changed[:, -1] += 1.0  # only the last image position's input changes (the tower itself mixes all patches)

    def hidden(m, feats):
        with torch.no_grad():
            embeds, _ = m.embed_inputs(ids, features=feats)
            rows = m.text_attention(torch.ones_like(ids), ids == m.image_token_id)[:, None]
            return m.run_decoder(embeds, rows, torch.arange(ids.shape[1])[None], image_positions=ids == m.image_token_id)

    for m, sees_later in ((model, True), (causal, False)):
        before, after = hidden(m, features), hidden(m, changed)
        assert not torch.allclose(before[:, last], after[:, last])
        assert torch.allclose(before[:, first], after[:, first], atol=1e-6) is not sees_later
        torch.testing.assert_close(before[:, :first], after[:, :first])  # the request never sees the image


def test_bidirectional_image_kv_cached_generation_equals_whole_sequence_and_batch():
    model, proc = _bidirectional(seed=8)
    prompts = [_prompt(proc, "the red circle"), _prompt(proc, "a much longer query about the blue star")]
    pixels = torch.randn(2, 3, 64, 64)
    both = _gen(model, proc, prompts, pixels)
    for i, prompt in enumerate(prompts):
        assert _gen(model, proc, [prompt], pixels[i : i + 1]).tokens[0] == both.tokens[i]  # left padding is inert
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(len(both.tokens[i])):  # recompute everything with the training path's attention
                x = torch.tensor([ids])
                embeds, _ = model.embed_inputs(x, pixels[i : i + 1])
                rows = model.text_attention(torch.ones_like(x), x == model.image_token_id)[:, None]
                hidden = model.run_decoder(embeds, rows, torch.arange(len(ids))[None], image_positions=x == model.image_token_id)
                ids.append(int(model.lm.get_output_embeddings()(hidden[:, -1]).argmax(-1)))
        assert ids[len(prompt):] == both.tokens[i]


def test_unknown_image_attention_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="image_attention must be one of"):
        tiny_model(model_options={"image_attention": "sideways"})
