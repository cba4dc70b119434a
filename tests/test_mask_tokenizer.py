import numpy as np
import pytest
import torch

from mmseg.modeling.mask_tokenizer import MaskTokenizer, MaskTokenizerConfig

TINY = MaskTokenizerConfig(mask_size=32, patch_size=8, width=32, encoder_layers=2, decoder_layers=2, heads=2,
                           num_tokens=8, codebook_size=64, code_dim=8)


def _disc(size=48, r=12):
    yy, xx = np.mgrid[:size, :size]
    return (yy - size / 2) ** 2 + (xx - size / 3) ** 2 < r * r


def test_shapes_for_masks_of_any_size():
    tok = MaskTokenizer(TINY).eval()
    ids = tok.encode(_disc(48))
    assert ids.shape == (8,) and ids.dtype == torch.long and int(ids.max()) < 64
    assert tok.decode(ids, size=(30, 70)).shape == (30, 70)
    assert tok.decode(ids, keep=3).shape == (32, 32)
    batch = tok.encode(torch.stack([torch.from_numpy(_disc(40)), torch.zeros(40, 40, dtype=torch.bool)]))
    assert batch.shape == (2, 8)


def test_latent_order_is_causal():
    """Changing a later latent never changes an earlier latent's encoding."""
    torch.manual_seed(0)
    tok = MaskTokenizer(TINY).eval()
    mask = torch.from_numpy(_disc(32))[None]
    with torch.no_grad():
        before = tok.encode_latents(mask)
        tok.latents.data[5:] += torch.randn_like(tok.latents.data[5:])
        after = tok.encode_latents(mask)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_dropped_tokens_do_not_reach_the_decoder():
    torch.manual_seed(0)
    tok = MaskTokenizer(TINY).eval()
    ids = tok.encode(_disc(32))
    other = ids.clone()
    other[4:] = (other[4:] + 7) % 64
    torch.testing.assert_close(tok.decode(ids, keep=4), tok.decode(other, keep=4))
    assert not torch.allclose(tok.decode(ids), tok.decode(other))
    with pytest.raises(ValueError, match="keep"):
        tok.decode(ids, keep=0)


def test_soft_decoding_of_one_hot_equals_hard_decoding():
    tok = MaskTokenizer(TINY).eval()
    ids = tok.encode(_disc(32))
    probs = torch.nn.functional.one_hot(ids, 64).float()[None]
    with torch.no_grad():
        torch.testing.assert_close(tok.decode_soft(probs, keep=6)[0], tok.decode(ids, keep=6))
    with pytest.raises(ValueError, match="code probabilities"):
        tok.decode_soft(torch.ones(1, 8, 10))


def test_save_load_identity_and_codebook_mismatch(tmp_path):
    tok = MaskTokenizer(TINY).eval()
    tok.save_pretrained(tmp_path)
    loaded = MaskTokenizer.from_pretrained(tmp_path, expected=TINY)
    ids = tok.encode(_disc(32))
    assert torch.equal(loaded.encode(_disc(32)), ids)
    torch.testing.assert_close(loaded.decode(ids), tok.decode(ids))
    other = MaskTokenizerConfig(**{**TINY.__dict__, "codebook_size": 128})
    with pytest.raises(ValueError, match="codebook"):
        MaskTokenizer.from_pretrained(tmp_path, expected=other)
    with pytest.raises(FileNotFoundError, match="not a mask tokenizer"):
        MaskTokenizer.from_pretrained(tmp_path / "nowhere")


def test_dead_codes_are_revived():
    """Codes unused since the last revival are re-seeded from recent latents; the usage window restarts."""
    torch.manual_seed(0)
    tok = MaskTokenizer(TINY).train()
    recent = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    tok.quantizer(recent[None])  # counts the 5 latents' codes
    used = int((tok.quantizer.usage > 0).sum())
    before = tok.quantizer.normalized_codebook().clone()
    assert tok.quantizer.revive_dead_codes(recent) == 64 - used
    assert bool((tok.quantizer.usage == 0).all())
    after = tok.quantizer.normalized_codebook()
    changed = ~torch.isclose(before, after).all(-1)
    assert int(changed.sum()) == 64 - used
    # every revived code sits next to one of the recent latents
    assert bool(((after[changed] @ recent.t()).max(-1).values > 0.99).all())


def test_procedural_shapes_are_varied_and_non_empty():
    from mmseg.data.shapes import random_mask

    rng = np.random.default_rng(0)
    masks = [random_mask(rng, 64) for _ in range(40)]
    assert all(m.shape == (64, 64) and m.any() for m in masks)
    assert len({int(m.sum()) for m in masks}) > 30


@pytest.mark.slow
def test_tokenizer_training_learns_and_resumes(synthref_root, tmp_path):
    from mmseg.train_tokenizer import train_tokenizer

    first = train_tokenizer([synthref_root], tmp_path, TINY, steps=40, batch_size=16, progress=False, log_every=10,
                            save_every=20)
    history = __import__("json").loads((tmp_path / "tokenizer_history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    assert first["step"] == 40
    resumed = train_tokenizer([synthref_root], tmp_path, TINY, steps=50, batch_size=16, progress=False, log_every=10)
    assert resumed["step"] == 50
    tok = MaskTokenizer.from_pretrained(tmp_path, expected=TINY)
    assert tok.encode(_disc(32)).shape == (8,)


def test_held_out_round_trip_is_logged_during_training(synthref_root, tmp_path):
    import json

    import torch

    from mmseg.train_tokenizer import load_masks, mask_iou, round_trip_iou, train_tokenizer

    summary = train_tokenizer([synthref_root], tmp_path, TINY, steps=6, batch_size=8, progress=False, log_every=3,
                              val_data=[synthref_root], val_masks=5, eval_every=4)
    history = json.loads((tmp_path / "tokenizer_history.json").read_text())
    evals = [r for r in history if "val_iou" in r]
    assert [r["step"] for r in evals] == [4, 6]  # every eval_every steps and at the end
    assert set(evals[-1]["val_iou"]) == {"8", "2"}  # K and K/4 tokens
    assert summary["val_iou"] == evals[-1]["val_iou"] and "loss" in summary
    # The logged value is the round trip of the first val_masks held-out masks in their own frame.
    masks, kinds = load_masks([synthref_root], 5)
    assert masks.shape[0] == 5 and masks.dtype == bool and len(kinds) == 5
    tok = MaskTokenizer.from_pretrained(tmp_path)
    assert round(float(round_trip_iou(tok, torch.from_numpy(masks), (8,))[8].mean()), 4) == evals[-1]["val_iou"]["8"]
    both_empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert mask_iou(both_empty, both_empty).tolist() == [1.0]


def test_train_tokenizer_without_masks_is_a_clear_error(tmp_path):
    from mmseg.train_tokenizer import train_tokenizer

    with pytest.raises(FileNotFoundError, match="instances.json"):
        train_tokenizer([tmp_path], tmp_path / "out", TINY, steps=1)
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match="no annotation masks"):
        train_tokenizer([tmp_path], tmp_path / "out", TINY, steps=1, val_data=[tmp_path])


def test_tokenizer_batches_depend_only_on_the_step(synthref_root):
    """Loader workers and resuming cannot change the data: batch ``step`` is a function of (seed, step)."""
    from pathlib import Path

    from mmseg.train_tokenizer import MaskSource, TokenizerBatches

    source = MaskSource(sorted(Path(synthref_root).glob("*/instances.json")), size=64)
    whole = TokenizerBatches(source, seed=3, first=0, steps=6, batch_size=5, num_tokens=8)
    resumed = TokenizerBatches(source, seed=3, first=4, steps=6, batch_size=5, num_tokens=8)
    assert len(whole) == 6 and len(resumed) == 2
    masks, keep = whole[4]
    assert masks.shape == (5, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert keep.shape == (5,) and 1 <= int(keep.min()) and int(keep.max()) <= 8
    again, keep_again = resumed[0]
    assert torch.equal(masks, again) and torch.equal(keep, keep_again)
    loader = torch.utils.data.DataLoader(whole, batch_size=None, num_workers=2)
    for step, (m, k) in enumerate(loader):
        assert torch.equal(m, whole[step][0]) and torch.equal(k, whole[step][1])


@pytest.mark.slow
def test_tokenizer_training_with_workers_equals_training_in_the_loop(synthref_root, tmp_path):
    from mmseg.train_tokenizer import train_tokenizer

    torch.manual_seed(0)
    inline = train_tokenizer([synthref_root], tmp_path / "a", TINY, steps=6, batch_size=8, progress=False, log_every=3,
                             device="cpu")
    torch.manual_seed(0)
    workers = train_tokenizer([synthref_root], tmp_path / "b", TINY, steps=6, batch_size=8, progress=False, log_every=3,
                              device="cpu", num_workers=2)
    assert inline["loss"] == workers["loss"] and inline["step"] == workers["step"] == 6


def test_residual_pixel_decoder_and_config_overrides(tmp_path):
    config = TINY.with_overrides(["pixel_decoder=residual"])
    assert config.pixel_decoder == "residual" and TINY.pixel_decoder == "deconv"
    tok = MaskTokenizer(config).eval()
    assert tok.decode(tok.encode(_disc(32)), size=(40, 40)).shape == (40, 40)
    tok.save_pretrained(tmp_path)
    assert MaskTokenizer.from_pretrained(tmp_path).config.pixel_decoder == "residual"
    with pytest.raises(ValueError, match="valid: deconv, residual"):
        TINY.with_overrides(["pixel_decoder=fancy"])
    with pytest.raises(ValueError, match="KEY one of"):
        TINY.with_overrides(["colour=3"])


def test_pixel_scale_widens_only_the_painting_stages(tmp_path):
    base, wide = MaskTokenizer(TINY), MaskTokenizer(TINY.with_overrides(["pixel_scale=2"]))
    count = lambda m, prefix: sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert count(wide, "to_pixels.") > 2 * count(base, "to_pixels.")
    assert count(wide, "decoder.") == count(base, "decoder.") and count(wide, "encoder.") == count(base, "encoder.")
    wide.eval().save_pretrained(tmp_path)
    again = MaskTokenizer.from_pretrained(tmp_path)
    ids = wide.encode(_disc(32))
    assert torch.equal(again.decode(ids, size=(40, 40)), wide.decode(ids, size=(40, 40)))
    with pytest.raises(ValueError, match="pixel_scale"):
        TINY.with_overrides(["pixel_scale=0"])


def test_loss_at_frame_scores_the_resampled_logits():
    """At the frame, the loss compares logits resampled to the masks' size with the masks themselves."""
    import torch.nn.functional as F

    from mmseg.modeling.losses import dice_loss
    from mmseg.train_tokenizer import boundary_weights, tokenizer_loss

    torch.manual_seed(0)
    tok = MaskTokenizer(TINY).eval()
    masks = torch.from_numpy(np.stack([_disc(64, 14), _disc(64, 8)])).float()
    keep = torch.tensor([8, 3])
    framed = tokenizer_loss(tok, masks, keep, at_frame=True)
    native = tokenizer_loss(tok, masks, keep)
    assert framed["logits"].shape == native["logits"].shape == (2, 32, 32)  # the tokenizer's own output
    up = F.interpolate(framed["logits"][:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    expected = F.binary_cross_entropy_with_logits(up, masks, weight=boundary_weights(masks))
    assert torch.allclose(framed["bce"], expected) and torch.allclose(framed["dice"], dice_loss(up, masks))
    assert not torch.allclose(framed["bce"], native["bce"])


def test_procedural_fraction_is_checked_and_honoured(synthref_root):
    from mmseg.masks import decode_segmentation
    from mmseg.train_tokenizer import MaskSource, instance_files, letterbox_mask

    files = instance_files([synthref_root])
    with pytest.raises(ValueError, match="procedural_fraction"):
        MaskSource(files, 64, procedural_fraction=1.5)
    annotated = MaskSource(files, 64, procedural_fraction=0.0)
    rng = np.random.default_rng(0)
    known = {letterbox_mask(decode_segmentation(seg, h, w), 64).tobytes() for seg, h, w in annotated.items}
    assert all(annotated.draw(rng).tobytes() in known for _ in range(10))


def test_decoder_retraining_keeps_every_code(synthref_root, tmp_path):
    from mmseg.train_tokenizer import init_tokenizer, train_tokenizer

    torch.manual_seed(0)
    MaskTokenizer(TINY).save_pretrained(tmp_path / "base")
    base = MaskTokenizer.from_pretrained(tmp_path / "base")
    residual = TINY.with_overrides(["pixel_decoder=residual"])
    model, fresh = init_tokenizer(tmp_path / "base", residual)
    assert fresh and all(name.startswith("to_pixels.") for name in fresh)  # only the new pixel decoder is new
    train_tokenizer([synthref_root], tmp_path / "dec", residual, steps=4, batch_size=8, progress=False, log_every=2,
                    init=tmp_path / "base", train_part="decoder", device="cpu")
    retrained = MaskTokenizer.from_pretrained(tmp_path / "dec")
    masks = torch.stack([torch.from_numpy(_disc(32)), torch.from_numpy(_disc(32)).flip(0).roll(5, 1)])
    assert torch.equal(retrained.encode(masks), base.encode(masks))  # the codes are frozen
    assert torch.equal(retrained.quantizer.codebook, base.quantizer.codebook)
    assert not torch.equal(retrained.to_pixels.net[0].weight, model.to_pixels.net[0].weight)  # the decoder learnt
    with pytest.raises(ValueError, match="resume it with that"):
        train_tokenizer([synthref_root], tmp_path / "dec", residual, steps=6, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="name it with init"):
        train_tokenizer([synthref_root], tmp_path / "x", residual, steps=1, train_part="decoder", progress=False)
    with pytest.raises(ValueError, match="codebook"):
        init_tokenizer(tmp_path / "base", TINY.with_overrides([f"codebook_size={2 * TINY.codebook_size}"]))


def test_bf16_training_keeps_fp32_weights_and_code_search(synthref_root, tmp_path):
    from mmseg.train_tokenizer import train_tokenizer

    torch.manual_seed(0)
    summary = train_tokenizer([synthref_root], tmp_path, TINY, steps=3, batch_size=8, progress=False, log_every=1,
                              device="cpu", mixed_precision="bf16")
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    tok = MaskTokenizer.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in tok.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok.train()(torch.from_numpy(_disc(32))[None].float())
    assert out["latents"].dtype == out["logits"].dtype == torch.float32
    assert out["ids"].shape == (1, TINY.num_tokens) and int(out["ids"].max()) < TINY.codebook_size
    with pytest.raises(ValueError, match="valid: no, bf16"):
        train_tokenizer([synthref_root], tmp_path / "x", TINY, steps=1, progress=False, mixed_precision="fp8")


def test_refined_codes_decode_at_least_as_well_at_every_prefix_level(tmp_path):
    """Decode-aware encoding on the committed tokenizer: on average at least as good as the nearest codes at every
    power-of-two prefix and better at the full length; within a level a choice never lowers that level's IoU;
    deterministic; the config's default when set there."""
    import dataclasses
    from pathlib import Path

    from mmseg.data.shapes import random_mask
    from mmseg.modeling.mask_tokenizer import mask_iou, prefix_level

    assert [prefix_level(i, 32) for i in (0, 1, 2, 3, 4, 7, 8, 31)] == [1, 2, 4, 4, 8, 8, 16, 32]
    assert prefix_level(5, 6) == 6
    tok = MaskTokenizer.from_pretrained(Path(__file__).parents[1] / "checkpoints/synthref-himtok/mask_tokenizer")
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(np.stack([random_mask(rng, 128) for _ in range(4)] + [_disc(128, 20)]))
    nearest = tok.encode(masks)
    assert torch.equal(tok.encode(masks, refine=1), nearest)  # one candidate: the nearest code itself
    refined = tok.encode(masks, refine=3)
    assert torch.equal(tok.encode(masks, refine=3), refined)
    gains = []
    for k in (1, 2, 4, 8, 16, 32):
        before = mask_iou(tok.decode(nearest, keep=k, size=(128, 128)) > 0, masks)
        after = mask_iou(tok.decode(refined, keep=k, size=(128, 128)) > 0, masks)
        gains.append(float((after - before).mean()))
    assert min(gains) >= 0 and gains[-1] > 0.005, gains
    # Within the last level, each token's choice is the best of its candidates given the others: changing the
    # final token back to its nearest code cannot decode better than the refined one.
    undone = refined.clone()
    undone[:, -1] = nearest[:, -1]
    full = lambda ids: mask_iou(tok.decode(ids, size=(128, 128)) > 0, masks)  # noqa: E731
    assert bool((full(refined) >= full(undone)).all())
    tok.config = dataclasses.replace(tok.config, refine_candidates=3)
    assert torch.equal(tok.encode(masks), refined)
    tok.save_pretrained(tmp_path)
    assert torch.equal(MaskTokenizer.from_pretrained(tmp_path).encode(masks[4]), refined[4])
    with pytest.raises(ValueError, match="refine_candidates"):
        TINY.with_overrides(["refine_candidates=-1"])


def test_tokenizer_benchmark_reports_nearest_and_refined_codes(synthref_root, tmp_path, monkeypatch, capsys):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("tokenizer_benchmark", root / "benchmarks" / "tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["tokenizer.py", "--tokenizer", str(root / "checkpoints/synthref-himtok/mask_tokenizer"),
                                      "--data", str(synthref_root), "--n", "6", "--refine", "0", "2",
                                      "--json", str(tmp_path / "tok.json")])
    bench.main()
    out = json.loads((tmp_path / "tok.json").read_text())
    refined = out["refine"]["2"]
    assert out["n_masks"] == refined["n_masks"] == 6 and out["frame"] == 128
    assert (out["refine_candidates"], refined["refine_candidates"]) == (0, 2)
    assert list(out["round_trip"]) == list(refined["round_trip"]) == ["1", "2", "4", "8", "16", "32"]
    assert refined["round_trip"]["32"]["iou"] > out["round_trip"]["32"]["iou"]
    printed = capsys.readouterr().out
    assert "codes: nearest" in printed and "codes: refined over 2" in printed


def test_the_next_tokenizer_loads_and_fits_the_himtok_codebook():
    from pathlib import Path

    root = Path(__file__).parents[1] / "checkpoints"
    current = MaskTokenizer.from_pretrained(root / "synthref-himtok/mask_tokenizer")
    nxt = MaskTokenizer.from_pretrained(root / "synthref-himt-tokenizer", expected=current.config)
    assert nxt.config.refine_candidates == 0 and nxt.encode(_disc(128, 20)).shape == (32,)
