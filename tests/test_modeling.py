import dataclasses
import json

import pytest
import torch

from mmseg.modeling.builder import CheckpointError, build_model, load_pretrained
from mmseg.modeling.model import causal_text_attention
from tiny import losses_under_one_seed, tiny_config, tiny_model


def _batch(model, proc, masks=True):
    ids, labels = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    ids2, labels2 = proc.encode_chat([{"role": "user", "content": "how many circles are there?"}], "2")
    width = max(len(ids), len(ids2))
    pad = lambda x, v: x + [v] * (width - len(x))
    b = {
        "input_ids": torch.tensor([pad(ids, proc.pad_token_id), pad(ids2, proc.pad_token_id)]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0), pad([1] * len(ids2), 0)]),
        "labels": torch.tensor([pad(labels, -100), pad(labels2, -100)]),
        "pixel_values": torch.randn(2, 3, 64, 64),
        "mask_targets": torch.zeros(2, 64, 64),
        "seg_positions": torch.tensor([ids.index(proc.seg_token_id), -1]),
    }
    b["mask_targets"][0, 10:30, 20:40] = 1
    return b


def test_forward_gives_finite_losses_and_gradients():
    model, proc = tiny_model()
    model.train()
    losses = model(_batch(model, proc))
    assert set(losses) >= {"text_ce", "mask_bce", "mask_dice", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert model.head.mask_embedding.grad is not None and model.vision.visual.conv1.weight.grad is not None


def test_placeholder_count_mismatch_is_a_clear_error():
    model, proc = tiny_model()
    batch = _batch(model, proc)
    batch["input_ids"][0, batch["input_ids"][0].tolist().index(proc.image_token_id)] = proc.pad_token_id
    with pytest.raises(ValueError, match="placeholder count"):
        model(batch)


def test_bool_4d_mask_matches_the_lm_own_causal_mask():
    model, proc = tiny_model()
    ids, _ = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    input_ids = torch.tensor([ids])
    embeds, _ = model.embed_inputs(input_ids, torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        ours = model.decoder(inputs_embeds=embeds, attention_mask=causal_text_attention(torch.ones_like(input_ids))[:, None],
                             position_ids=torch.arange(len(ids))[None]).last_hidden_state
        theirs = model.decoder(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_mask_queries_do_not_change_text_losses():
    """Text never attends the appended mask queries: text CE is the same with or without them."""
    model, proc = tiny_model()
    batch = _batch(model, proc)
    with torch.no_grad():
        with_queries = model(batch)["text_ce"]
        batch["seg_positions"][:] = -1  # queries still appended, but masked
        model.head.mask_embedding.data += 5.0
        assert torch.allclose(model(batch)["text_ce"], with_queries)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_save_and_reload_identical(tmp_path, stem):
    model, proc = tiny_model(model_options={"vision": dataclasses.replace(tiny_config().vision, stem=stem)})
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["lm"]["hf_config"]["hidden_size"] == 32  # reload needs no hub
    loaded, proc2 = load_pretrained(tmp_path)
    batch = _batch(model, proc)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert proc2.encode_user_text("the red circle") == proc.encode_user_text("the red circle")


def test_not_a_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(tmp_path)
    model, proc = tiny_model()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not an mmseg config"):
        load_pretrained(tmp_path)


def test_weights_of_another_model_are_refused(tmp_path):
    model, proc = tiny_model()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["model"]["head"]["upsample"] = 2  # the stored weights no longer fit this config
    (tmp_path / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError):
        load_pretrained(tmp_path)


def test_weights_missing_or_extra_tensors_are_named(tmp_path):
    """A weights file with a tensor too few or too many says which (it used to fail on slicing a set)."""
    from safetensors.torch import load_file, save_file

    model, proc = tiny_model()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(weights)[0]
    extra = {**{k: v for k, v in weights.items() if k != dropped}, "head.not_a_part": torch.zeros(2)}
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"1 missing \(e.g. \['{dropped}'\]\), 1 unexpected "
                                              r"\(e.g. \['head.not_a_part'\]\)"):
        load_pretrained(tmp_path)


def test_bf16_checkpoint_reloads_close_to_fp32(tmp_path):
    model, proc = tiny_model()
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    proc.save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    batch = _batch(model, proc)
    with torch.no_grad():
        a, b = model(batch)["loss"], loaded(batch)["loss"]
    assert abs(float(a) - float(b)) < 0.05 * float(a)


def test_projector_norm_matches_the_embedding_scale_and_merger_shortens_the_prefix(tmp_path):
    """From-scratch presets normalise image features to the token-embedding scale and merge 2x2 patches into
    one prefix token; heads still get one feature per patch, and the checkpoint reloads identically."""
    import torch

    from mmseg.modeling.builder import load_pretrained
    from mmseg.predictor import Segmenter
    from tiny import force_answer, tiny_model

    model, processor = tiny_model(model_options={"projector_norm": True, "image_merge": 2})
    plain, plain_processor = tiny_model()
    assert processor.num_patches == plain_processor.num_patches // 4
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.image_features(pixels)
        embed_rms = model.lm.get_input_embeddings().weight.pow(2).mean().sqrt()
    assert features.shape[1] == plain_processor.num_patches  # heads: one feature per patch
    assert torch.allclose(features.pow(2).mean(-1).sqrt(), embed_rms.expand(2, features.shape[1]), rtol=1e-3)
    ids, _ = processor.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    assert ids.count(processor.image_token_id) == processor.num_patches

    image = (torch.rand(64, 80, 3) * 255).byte().numpy()
    segmenter = Segmenter(model, processor)
    answer_ids = processor.tokenizer("Sure, <seg>.")["input_ids"] + [processor.tokenizer.eos_token_id]
    model.head.constrain = force_answer(answer_ids)
    before = segmenter(image, "the red circle")
    model.head.constrain = type(model.head).constrain.__get__(model.head)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    reloaded, reprocessor = load_pretrained(tmp_path / "ckpt")
    reloaded.head.constrain = force_answer(answer_ids)
    after = Segmenter(reloaded, reprocessor)(image, "the red circle")
    assert before.masks and len(before.masks) == len(after.masks)
    assert (before.masks[0] == after.masks[0]).all()


def test_merge_that_does_not_divide_the_grid_is_a_clear_error():
    import pytest

    from tiny import tiny_config, tiny_model

    with pytest.raises(ValueError, match="image_merge=3 must divide the patch grid"):
        tiny_model(model_options={"image_merge": 3})


def test_merged_prefix_trains_under_bf16_autocast():
    from tiny import tiny_config, tiny_model

    model, processor = tiny_model(model_options={"projector_norm": True, "image_merge": 2})
    model.train()
    ids, labels = processor.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    batch = {
        "input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "labels": torch.tensor([labels]), "pixel_values": torch.randn(1, 3, 64, 64),
        "mask_targets": torch.zeros(1, 64, 64), "seg_positions": torch.tensor([ids.index(processor.seg_token_id)]),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.merger.proj.weight.grad is not None


def test_eager_attention_gives_the_same_losses_tokens_and_masks_as_sdpa():
    """Eager attention adds a 4-D mask to its scores, so ``run_decoder`` turns our bool masks into 0 / dtype-min for
    it: same weights, same losses (text and mask), same generated tokens and mask logits under either kernel."""
    from mmseg.predictor import Segmenter

    sdpa, proc = tiny_model(seed=5)
    eager, _ = tiny_model(seed=5, model_options={"lm": dataclasses.replace(sdpa.config.lm, attn_implementation="eager")})
    eager.load_state_dict(sdpa.state_dict())
    assert eager.lm.config._attn_implementation == "eager" and sdpa.lm.config._attn_implementation == "sdpa"
    batch = _batch(sdpa, proc)
    with torch.no_grad():
        a, b = sdpa(batch), eager(batch)
    for key in ("text_ce", "mask_bce", "mask_dice"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    image = torch.rand(64, 64, 3).mul(255).byte().numpy()
    ours, theirs = Segmenter(sdpa, proc)(image, "the red circle"), Segmenter(eager, proc)(image, "the red circle")
    assert ours.text == theirs.text
    assert len(ours.masks) == len(theirs.masks)
    for m1, m2 in zip(ours.masks, theirs.masks):
        assert (m1 == m2).mean() > 0.999


def test_answer_cross_entropy_weights_only_each_rows_first_answer_token():
    import torch.nn.functional as F

    from mmseg.modeling.losses import answer_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6], [-100, -100, -100, -100, 7, 8]])
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(answer_cross_entropy(logits, labels), plain)
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                reduction="none").view(2, 5)
    first = per_token[0, 1] + per_token[1, 3]  # the positions predicting labels 3 and 7
    expected = (per_token.sum() + 2.0 * first) / 6
    assert torch.allclose(answer_cross_entropy(logits, labels, first_weight=3.0), expected)
    # only the scored positions go through the log-softmax: the gradient is the plain one, zero elsewhere
    mine, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    answer_cross_entropy(mine, labels).backward()
    F.cross_entropy(ref[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).backward()
    torch.testing.assert_close(mine.grad, ref.grad)
    assert answer_cross_entropy(logits, torch.full_like(labels, -100)) == 0  # nothing scored: zero, not NaN


def test_text_weight_scales_the_text_term_only():
    model, proc = tiny_model(seed=3)
    batch = _batch(model, proc)
    (plain,) = losses_under_one_seed(batch, model)
    model.text_weight = 2.5
    (weighted,) = losses_under_one_seed(batch, model)
    torch.testing.assert_close(weighted["text_ce"], 2.5 * plain["text_ce"])
    for key in set(plain) - {"text_ce", "loss"}:
        torch.testing.assert_close(weighted[key], plain[key])
    torch.testing.assert_close(weighted["loss"] - plain["loss"], 1.5 * plain["text_ce"])


def test_init_from_checkpoint_takes_the_weights_under_the_new_configs_options(tmp_path):
    """Fine-tuning starts from a checkpoint's weights and tokenizer under a preset whose training options differ;
    an architecture that does not match is a clear error."""
    import dataclasses

    from mmseg.modeling.builder import init_from_checkpoint

    model, proc = tiny_model()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    config = tiny_config(mask_loss_weight=2.0)
    started, started_proc = init_from_checkpoint(config, tmp_path)
    assert started.training and started.head.config.mask_loss_weight == 2.0
    assert len(started_proc.tokenizer) == len(proc.tokenizer)
    theirs = model.state_dict()
    for name, value in started.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    wider = dataclasses.replace(config, lm=dataclasses.replace(config.lm, intermediate_size=96))
    with pytest.raises(CheckpointError, match="do not match the config"):
        init_from_checkpoint(wider, tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        init_from_checkpoint(config, tmp_path / "missing")
