"""The HiMTok head: vocabulary, targets, hierarchical loss, constrained decoding, keep_tokens, persistence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmseg.generation import generate
from mmseg.modeling.builder import build_model, build_tokenizer, load_pretrained
from mmseg.modeling.heads.himtok import MT_END, MT_START, TOKENIZER_DIR, HiMTokHead, code_token
from mmseg.modeling.mask_tokenizer import MaskTokenizer, MaskTokenizerConfig
from mmseg.predictor import Segmenter
from tiny import CORPUS, losses_under_one_seed, tiny_config

K, CODES = 32, 64
TINY_TOKENIZER = MaskTokenizerConfig(mask_size=32, patch_size=8, width=32, encoder_layers=1, decoder_layers=1,
                                     heads=2, num_tokens=K, codebook_size=CODES, code_dim=8)


def _write_tokenizer(folder: Path, seed: int = 0, **changes) -> Path:
    torch.manual_seed(seed)
    config = MaskTokenizerConfig(**{**TINY_TOKENIZER.__dict__, **changes})
    MaskTokenizer(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return _write_tokenizer(tmp_path_factory.mktemp("himt") / "mask_tokenizer")


def _model(tokenizer_dir: Path, seed: int = 0, **options):
    torch.manual_seed(seed)
    config = tiny_config("himtok", tokenizer=str(tokenizer_dir), **options)
    model, proc = build_model(config, build_tokenizer(config, CORPUS, vocab_size=300))
    return model.eval(), proc


@pytest.fixture(scope="module")
def himtok(tokenizer_dir):
    return _model(tokenizer_dir)


def _opening_constrain(head: HiMTokHead, eos_token_id: int):
    """Like tests/tiny.py ``force_answer``, but only forces ``<mt_start>`` first and ``eos`` after ``<mt_end>``:
    everything in between is left to the head's own constrain (so an untrained model emits a mask)."""
    original = head.constrain

    def constrain(session, logits):
        for row, tokens in enumerate(session.tokens):
            forced = head.mt_start_id if not tokens else eos_token_id if tokens[-1] == head.mt_end_id else None
            if forced is not None:
                logits = logits.clone()
                logits[row] = -1e9
                logits[row, forced] = 0.0
        return original(session, logits)

    return constrain


@pytest.fixture()
def forced(himtok, monkeypatch):
    model, proc = himtok
    monkeypatch.setattr(model.head, "constrain", _opening_constrain(model.head, proc.eos_token_id))
    return model, proc


def _batch(proc, head, mask: torch.Tensor):
    rows = []
    for query, answer, m in (("the red circle", "Sure, <seg>.", mask), ("how many circles?", "2", None),
                             ("the blue square", "Sure, <seg>.", mask.flip(-1))):
        ids, labels = proc.encode_chat([{"role": "user", "content": query}], answer)
        rows.append((*head.expand_targets(ids, labels, m), m))
    width = max(len(r[0]) for r in rows)
    batch = {"input_ids": torch.full((3, width), proc.pad_token_id), "attention_mask": torch.zeros(3, width, dtype=torch.long),
             "labels": torch.full((3, width), -100), "pixel_values": torch.randn(3, 3, 64, 64),
             "mask_targets": torch.zeros(3, 64, 64), "seg_positions": torch.full((3,), -1)}
    for i, (ids, labels, m) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][i, : len(ids)] = 1
        if m is not None:
            batch["mask_targets"][i] = m
            batch["seg_positions"][i] = ids.index(head.mask_point_token_id)
    return batch


def _square_mask() -> torch.Tensor:
    mask = torch.zeros(64, 64)
    mask[12:40, 8:30] = 1
    return mask


# -- vocabulary and targets --------------------------------------------------------------------------------
def test_vocabulary_has_the_markers_and_one_token_per_code(himtok):
    model, proc = himtok
    vocab = proc.tokenizer.get_vocab()
    head = model.head
    assert MT_START in vocab and MT_END in vocab and code_token(0, CODES) == "<mt_0000>"
    assert [vocab[code_token(i, CODES)] for i in range(CODES)] == head.code_token_ids.tolist()
    assert head.mask_point_token_id == vocab[MT_START] != proc.seg_token_id
    assert model.lm.get_output_embeddings().weight.shape[0] >= len(proc.tokenizer)
    # the head tokens are appended after BPE training: they do not eat the text vocabulary
    assert len(proc.tokenizer) == 300 + CODES + 2


def test_expand_targets_puts_the_tokenizers_codes_between_the_markers(himtok):
    model, proc = himtok
    head = model.head
    mask = _square_mask()
    ids, labels = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    new_ids, new_labels = head.expand_targets(ids, labels, mask)
    start = new_ids.index(head.mt_start_id)
    span = new_ids[start + 1 : start + 1 + K]
    assert new_ids[start + 1 + K] == head.mt_end_id and proc.seg_token_id not in new_ids
    expected = head.mask_tokenizer.encode(mask).tolist()
    assert [head._code_of[t] for t in span] == expected and len(span) == K
    assert new_labels[start : start + K + 2] == new_ids[start : start + K + 2]  # the whole span is trained
    assert len(new_ids) == len(ids) + K + 1
    assert head.expand_targets(ids[:-3], [-100] * (len(ids) - 3), None) == (ids[:-3], [-100] * (len(ids) - 3))
    with pytest.raises(ValueError, match="no mask"):
        head.expand_targets(ids, labels, None)


def test_target_codes_are_memoised_per_mask_and_equal_a_fresh_encode(himtok):
    model, _ = himtok
    head = model.head
    head._code_cache.clear()
    square, shifted = _square_mask(), torch.roll(_square_mask(), 9, dims=1)
    first = head.codes_of(square)
    assert len(head._code_cache) == 1 and head.codes_of(square.clone()) == first  # a hit
    assert len(head._code_cache) == 1
    assert head.codes_of(shifted) == head.mask_tokenizer.encode(shifted).tolist()  # another mask: its own entry
    assert len(head._code_cache) == 2 and first == head.mask_tokenizer.encode(square).tolist()


def test_the_collator_marks_mt_start_as_the_mask_point(himtok):
    from mmseg.data.collate import Collator, Example

    model, proc = himtok
    image = Path(__file__).resolve().parents[1] / "examples" / "synthref_0.png"
    mask = np.zeros((128, 128), bool)
    mask[20:60, 30:90] = True
    batch = Collator(proc, model.head)([Example(image, "the cross", "Sure, <seg>.", mask),
                                         Example(image, "how many?", "2", None)])
    start = int(batch["seg_positions"][0])
    assert batch["input_ids"][0, start] == model.head.mt_start_id and int(batch["seg_positions"][1]) == -1
    assert batch["input_ids"][0, start + K + 1] == model.head.mt_end_id


# -- training ----------------------------------------------------------------------------------------------
def test_every_sampled_prefix_contributes_to_the_mask_loss(himtok):
    model, _ = himtok
    head = model.head
    target = _square_mask()[None].repeat(2, 1, 1)
    probs = torch.softmax(torch.randn(2, K, CODES) * 3, -1).requires_grad_(True)
    prefixes = torch.tensor([[5, 2], [5, 2]])
    _, _, terms = head.hierarchical_loss(probs, target, prefixes)
    assert terms.shape == (2,)
    _, _, only5 = head.hierarchical_loss(probs, target, prefixes[:, :1])
    _, _, only2 = head.hierarchical_loss(probs, target, prefixes[:, 1:])
    torch.testing.assert_close(terms, torch.cat([only5, only2]))
    grad_both, = torch.autograd.grad(terms.mean(), probs)
    grad5, = torch.autograd.grad(only5.sum(), probs)
    grad2, = torch.autograd.grad(only2.sum(), probs)
    torch.testing.assert_close(grad_both, 0.5 * (grad5 + grad2))  # the mean of BOTH terms, not only the last one
    assert grad2[:, :2].abs().sum() > 0 and grad2[:, 2:].abs().sum() == 0  # a prefix sees its own codes only
    assert grad_both[:, :5].abs().sum() > 0 and grad_both[:, 5:].abs().sum() == 0
    assert head.prefix_sigma(1) > head.prefix_sigma(16) > head.prefix_sigma(K - 1) > head.prefix_sigma(K) == 0


def test_the_model_loss_averages_all_sampled_prefixes(himtok, monkeypatch):
    model, proc = himtok
    head = model.head
    fixed = torch.tensor([[3, 7, 1], [3, 7, 1]])
    monkeypatch.setattr(head, "sample_prefixes", lambda n: fixed[:n])
    captured = {}
    original = head.hierarchical_loss

    def spy(probs, target, prefixes, prefix_rows=None, **kw):
        out = original(probs, target, prefixes, prefix_rows, **kw)
        captured.update(rows=probs.shape[0], prefixes=prefixes, terms=out[2])
        return out

    monkeypatch.setattr(head, "hierarchical_loss", spy)
    with torch.no_grad():
        losses = model(_batch(proc, head, _square_mask()))
    assert set(losses) == {"text_ce", "mask_bce", "mask_dice", "mask_prefix", "loss"}
    assert captured["rows"] == 2 and captured["terms"].shape == (3,)  # two masks (the QA row has none), 3 prefixes
    torch.testing.assert_close(losses["mask_prefix"], head.config.prefix_weight * captured["terms"].mean())


def test_mask_loss_samples_caps_the_decoded_rows(himtok, monkeypatch):
    """``mask_loss_samples`` decodes only a random subset of the batch's masks (the code CE still covers all)."""
    import dataclasses

    model, proc = himtok
    head = model.head
    monkeypatch.setattr(head, "config", dataclasses.replace(head.config, mask_loss_samples=1))
    seen = []
    original = head.hierarchical_loss
    monkeypatch.setattr(head, "hierarchical_loss", lambda probs, *a, **kw: seen.append(probs.shape[0]) or original(probs, *a, **kw))
    with torch.no_grad():
        losses = model(_batch(proc, head, _square_mask()))
    assert seen == [1] and all(torch.isfinite(v) for v in losses.values())


def test_prefix_samples_decodes_prefixes_of_a_subset_only(himtok, monkeypatch):
    """``prefix_samples`` caps the masks whose prefixes are decoded; every mask still gets its full decode, and a
    subset's prefix terms equal those of the same masks decoded on their own."""
    import dataclasses

    model, proc = himtok
    head = model.head
    target = torch.stack([_square_mask(), _square_mask().flip(0), _square_mask().t()])
    probs = torch.softmax(torch.randn(3, K, CODES) * 3, -1).requires_grad_(True)
    prefixes = torch.tensor([[4, 9], [2, 6]])
    rows = torch.tensor([0, 2])
    bce, _, terms = head.hierarchical_loss(probs, target, prefixes, rows)
    _, _, alone = head.hierarchical_loss(probs[rows], target[rows], prefixes)
    full_bce, _, _ = head.hierarchical_loss(probs, target, torch.zeros(3, 0, dtype=torch.long))
    torch.testing.assert_close(terms, alone)
    torch.testing.assert_close(bce, full_bce)
    grad, = torch.autograd.grad(terms.sum(), probs)
    assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    with pytest.raises(ValueError, match="prefix rows"):
        head.hierarchical_loss(probs, target, prefixes, torch.tensor([0]))

    monkeypatch.setattr(head, "config", dataclasses.replace(head.config, prefix_samples=1))
    picked, lengths = head.sample_prefix_rows(3)[::-1]
    assert picked.shape == (1,) and lengths.shape == (1, head.config.num_prefixes) and 0 <= int(picked) < 3
    seen = []
    original = head.hierarchical_loss
    monkeypatch.setattr(head, "hierarchical_loss",
                        lambda probs, target, pre, at=None, **kw: seen.append((probs.shape[0], pre.shape[0]))
                        or original(probs, target, pre, at, **kw))
    with torch.no_grad():
        losses = model(_batch(proc, head, _square_mask()))
    assert seen == [(2, 1)] and all(torch.isfinite(v) for v in losses.values())


def test_frozen_tokenizer_gets_no_gradient_and_stays_out_of_the_optimizer(himtok):
    model, proc = himtok
    head = model.head
    batch = _batch(proc, head, _square_mask())
    model.train()
    try:
        assert not head.mask_tokenizer.training  # model.train() leaves the frozen tokenizer in eval mode
        losses = model(batch)
        model.zero_grad()
        (losses["mask_bce"] + losses["mask_dice"] + losses["mask_prefix"]).backward()
    finally:
        model.eval()
    assert all(p.grad is None and not p.requires_grad for p in head.mask_tokenizer.parameters())
    names = {n for n, _ in model.named_parameters()}
    assert not any("mask_tokenizer" in n for n in names) and not any("mask_tokenizer" in k for k in model.state_dict())
    # the mask loss reaches the LM through the code logits (soft decode is differentiable)
    grad = model.lm.get_output_embeddings().weight.grad
    assert grad is not None and grad[head.code_token_ids].abs().sum() > 0
    model.zero_grad()


def test_loss_decreases_on_a_tiny_run(tokenizer_dir):
    model, proc = _model(tokenizer_dir, seed=1)
    batch = _batch(proc, model.head, _square_mask())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    history = []
    for _ in range(30):
        losses = model(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    # The mask terms are not asserted to fall: this tokenizer is random, so no code sequence decodes to the
    # target; what must hold is that the joint objective trains and every term stays finite.
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["text_ce"] < history[0]["text_ce"]
    assert all(np.isfinite(v) for h in history for v in h.values())


# -- inference ---------------------------------------------------------------------------------------------
def _generate(model, proc, queries, max_new_tokens=12, **options):
    prompts = [proc.encode_chat([{"role": "user", "content": q}])[0] for q in queries]
    return generate(model, prompts, torch.randn(len(queries), 3, 64, 64), eos_token_id=proc.eos_token_id,
                    pad_token_id=proc.pad_token_id, max_new_tokens=max_new_tokens, options=options)


def test_exactly_k_mask_tokens_at_inference_even_untrained(forced):
    model, proc = forced
    head = model.head
    gen = _generate(model, proc, ["the red circle", "a much longer query about the blue star"], max_new_tokens=3)
    for row in range(2):
        tokens = gen.tokens[row]
        assert tokens[0] == head.mt_start_id and tokens[K + 1] == head.mt_end_id
        assert all(t in head._code_of for t in tokens[1 : K + 1])  # in-vocabulary mask tokens, K of them
        assert len(gen.masks[row]) == 1 and gen.masks[row][0].info["keep_tokens"] == K
        assert gen.masks[row][0].info["mask_tokens"] == [head._code_of[t] for t in tokens[1 : K + 1]]
        assert gen.text_tokens[row][0] == proc.seg_token_id and head.mt_start_id not in gen.text_tokens[row]
    # the span did not count toward max_new_tokens=3: the mask is complete


def test_constrain_allows_codes_only_inside_a_span(himtok):
    model, _ = himtok
    head = model.head
    codes = head.code_token_ids.tolist()
    session = SimpleNamespace(tokens=[[5], [head.mt_start_id], [head.mt_start_id, *codes[:K]]],
                              batch_size=3, device=torch.device("cpu"), state={})
    logits = torch.randn(3, head.code_token_ids.max().item() + 1)
    allowed = head.constrain(session, logits) > torch.finfo(logits.dtype).min
    code_set = set(codes)
    assert not any(allowed[0, c] for c in code_set) and not allowed[0, head.mt_end_id] and allowed[0, 5]
    assert set(allowed[1].nonzero()[:, 0].tolist()) == code_set
    assert allowed[2].nonzero()[:, 0].tolist() == [head.mt_end_id]
    assert head.in_mask_span(session).tolist() == [False, True, True]
    # each constrained step records the soft code distribution: softmax(2 * logits over the codes)
    recorded = session.state["himtok"]["probs"][1][0]
    assert len(recorded) == 1
    torch.testing.assert_close(recorded[0], torch.softmax(2.0 * logits[1, head.code_token_ids], -1))
    session.tokens[1].append(codes[7])
    head.constrain(session, logits)
    head.constrain(session, logits)  # a repeated call at the same step overwrites, never grows
    assert len(session.state["himtok"]["probs"][1][0]) == 2 and session.state["himtok"]["probs"][2] == []


def test_keep_tokens_reaches_the_decoder_and_bad_values_are_clear_errors(forced, monkeypatch):
    model, proc = forced
    tokenizer = model.head.mask_tokenizer
    seen = []
    original = tokenizer.decode_soft

    def spy(probs, keep=None, size=None):
        seen.append(keep)
        return original(probs, keep=keep, size=size)

    monkeypatch.setattr(tokenizer, "decode_soft", spy)
    seg = Segmenter(model, proc)
    image = Image.new("RGB", (50, 30), (200, 20, 20))
    masks = {}
    for k in (1, 4, 16, None):
        answer = seg(image, "the red one", **({} if k is None else {"keep_tokens": k}))
        assert seen[-1] == (K if k is None else k) and answer.info[0]["keep_tokens"] == (K if k is None else k)
        masks[k] = answer.logits[0]
    assert not np.allclose(masks[1], masks[None])  # fewer tokens decode to a different (coarser) mask
    for bad in (0, K + 1, 2.5, "8", True, -3):
        with pytest.raises(ValueError, match="keep_tokens must be a whole number from 1 to 32"):
            seg(image, "the red one", keep_tokens=bad)
    with pytest.raises(ValueError, match="unknown option"):
        seg(image, "the red one", keep_token=8)


@pytest.mark.parametrize("size", [(64, 64), (90, 40), (33, 120)])
def test_segmenter_returns_a_bool_mask_at_the_original_size(forced, size):
    model, proc = forced
    answer = Segmenter(model, proc)(Image.new("RGB", size, (10, 200, 30)), "the green square", keep_tokens=8)
    assert answer.text == "<seg>"
    assert len(answer.masks) == 1 and answer.masks[0].shape == (size[1], size[0]) and answer.masks[0].dtype == bool
    assert len(answer.info[0]["mask_tokens"]) == K


def test_batched_decoding_equals_one_at_a_time(forced):
    model, proc = forced
    seg = Segmenter(model, proc)
    images = [Image.new("RGB", (40, 40), (200, 0, 0)), Image.new("RGB", (60, 30), (0, 0, 200))]
    convs = [[{"role": "user", "content": "the red one"}], [{"role": "user", "content": "the blue thing on the left"}]]
    both = seg.batch(convs, images, keep_tokens=12)
    for i in range(2):
        one = seg.chat(convs[i], images[i], keep_tokens=12)
        assert one.info == both[i].info
        np.testing.assert_allclose(one.logits[0], both[i].logits[0], atol=1e-4, rtol=1e-4)


# -- persistence -------------------------------------------------------------------------------------------
def test_save_and_from_pretrained_give_identical_answers(forced, tmp_path, monkeypatch):
    model, proc = forced
    seg = Segmenter(model, proc)
    seg.save_pretrained(tmp_path)
    assert (tmp_path / TOKENIZER_DIR / "mask_tokenizer_config.json").is_file()
    head_config = json.loads((tmp_path / "config.json").read_text())["model"]["head"]
    assert head_config["name"] == "himtok" and head_config["codebook_size"] == CODES and head_config["num_tokens"] == K
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    monkeypatch.setattr(loaded.model.head, "constrain", _opening_constrain(loaded.model.head, proc.eos_token_id))
    for name, p in model.head.mask_tokenizer.state_dict().items():
        torch.testing.assert_close(loaded.model.head.mask_tokenizer.state_dict()[name], p)
    image = Image.new("RGB", (48, 40), (0, 0, 255))
    for k in (5, None):
        options = {} if k is None else {"keep_tokens": k}
        a, b = seg(image, "the blue one", **options), loaded(image, "the blue one", **options)
        assert a.text == b.text and a.info == b.info and np.array_equal(a.masks[0], b.masks[0])


def test_a_mismatched_tokenizer_fails_with_a_clear_message(himtok, tokenizer_dir, tmp_path):
    model, proc = himtok
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / TOKENIZER_DIR)
    _write_tokenizer(tmp_path / "ckpt" / TOKENIZER_DIR, codebook_size=2 * CODES)
    with pytest.raises(ValueError, match=f"expects {K} tokens over {CODES}x8"):
        load_pretrained(tmp_path / "ckpt")
    # a preset whose text vocabulary was built for another codebook
    other = _write_tokenizer(tmp_path / "other", codebook_size=2 * CODES)
    config = tiny_config("himtok", tokenizer=str(other))
    with pytest.raises(ValueError, match=f"vocabulary has {CODES} mask code tokens but the mask tokenizer has {2 * CODES}"):
        build_model(config, proc.tokenizer)
    with pytest.raises(ValueError, match="codebook_size=128, but the himtok head's config says 64"):
        build_model(tiny_config("himtok", tokenizer=str(other), codebook_size=CODES), proc.tokenizer)


def test_missing_tokenizer_names_the_training_command(himtok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config("himtok", tokenizer="checkpoints/nowhere/mask_tokenizer")
    with pytest.raises(FileNotFoundError, match="mmseg train-tokenizer .*--out checkpoints/nowhere/mask_tokenizer"):
        build_tokenizer(config, CORPUS, vocab_size=300)
    with pytest.raises(ValueError, match="mmseg train-tokenizer"):
        build_tokenizer(tiny_config("himtok"), CORPUS, vocab_size=300)
    model, proc = himtok
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / TOKENIZER_DIR)
    with pytest.raises(FileNotFoundError, match="without its mask tokenizer"):
        load_pretrained(tmp_path / "ckpt")


def test_preset_paths_resolve_against_the_current_directory(tokenizer_dir, tmp_path, monkeypatch):
    from mmseg.config import load_preset

    preset = load_preset("tiny-himtok")
    assert preset.model.head["tokenizer"] == "checkpoints/synthref-himtok/mask_tokenizer"
    stamp = load_preset("tiny-stamp").model
    for name in ("vision", "lm", "patch_labels", "patch_size_bins", "image_attention", "ground_presence"):
        assert getattr(preset.model, name) == getattr(stamp, name), name  # one backbone recipe for both heads
    shutil.copytree(tokenizer_dir, tmp_path / "checkpoints" / "synthref-himtok" / "mask_tokenizer")
    monkeypatch.chdir(tmp_path)
    config = tiny_config("himtok", tokenizer="checkpoints/synthref-himtok/mask_tokenizer")
    model, _ = build_model(config, build_tokenizer(config, CORPUS, vocab_size=300))
    assert model.head.codebook_size == CODES


def test_new_rows_of_a_pretrained_lm_start_at_the_mean(tokenizer_dir, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmseg.config import LMConfig, ModelConfig, VisionConfig
    from mmseg.processing import train_bpe_tokenizer

    tok = train_bpe_tokenizer(CORPUS, 280)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=False))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    old_in, old_out = lm.get_input_embeddings().weight.detach(), lm.get_output_embeddings().weight.detach()
    config = ModelConfig(vision=VisionConfig(image_size=32, patch_size=16, width=16, layers=1, heads=2),
                         lm=LMConfig(name=str(tmp_path / "lm")), head={"name": "himtok", "tokenizer": str(tokenizer_dir)})
    model, _ = build_model(config, build_tokenizer(config))
    rows = model.head.code_token_ids
    for new, old in ((model.lm.get_input_embeddings().weight, old_in), (model.lm.get_output_embeddings().weight, old_out)):
        torch.testing.assert_close(new[rows], old.mean(0).expand(len(rows), -1), atol=1e-3, rtol=0)
        torch.testing.assert_close(new[: len(old)], old)


def test_predict_cli_with_keep_tokens(himtok, tmp_path, monkeypatch):
    from mmseg.cli import main

    model, proc = himtok
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    original = HiMTokHead.constrain

    def constrain(self, session, logits):  # the reloaded, untrained model still opens one mask
        return _opening_constrain(SimpleNamespace(constrain=lambda s, l: original(self, s, l), mt_start_id=self.mt_start_id,
                                                  mt_end_id=self.mt_end_id), proc.eos_token_id)(session, logits)

    monkeypatch.setattr(HiMTokHead, "constrain", constrain)
    image = tmp_path / "x.png"
    Image.new("RGB", (70, 50), (0, 200, 0)).save(image)
    prefix = tmp_path / "out" / "p"
    assert main(["predict", "--model", str(tmp_path / "ckpt"), "--image", str(image), "--query", "the green one",
                 "--out", str(prefix), "--keep-tokens", "4"]) == 0
    record = json.loads(Path(f"{prefix}_masks.json").read_text())
    assert record["text"] == "<seg>" and record["info"][0]["keep_tokens"] == 4 and len(record["info"][0]["mask_tokens"]) == K
    assert Image.open(f"{prefix}_mask.png").size == (70, 50)
    assert main(["predict", "--model", str(tmp_path / "ckpt"), "--image", str(image), "--query", "the green one",
                 "--out", str(prefix), "--keep-tokens", "40"]) == 2


@pytest.mark.slow
def test_the_shared_training_loop_trains_and_saves_a_himtok_model(synthref_root, tokenizer_dir, tmp_path):
    from mmseg.config import load_preset
    from mmseg.train import train

    config = tiny_config("himtok", tokenizer=str(tokenizer_dir)).to_dict()
    config["lm"].pop("hf_config"), config["vision"].pop("hf_config")
    train_options = {"batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "max_steps": 3, "eval_every": 1000, "eval_samples": 4,
                     "save_every": 1000, "log_every": 1, "mixed_precision": "no", "vocab_size": 400, "qa_fraction": 0.0}
    path = tmp_path / "tiny-himtok.json"
    path.write_text(json.dumps({"model": config, "train": train_options}))
    out = tmp_path / "ckpt"
    summary = train(load_preset(path), synthref_root, out, progress=False)
    assert summary["step"] == 3 and "val_ciou" in summary
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("mask_prefix" in h and np.isfinite(h["mask_prefix"]) for h in history if "loss" in h)
    assert (out / TOKENIZER_DIR / "mask_tokenizer.safetensors").is_file()
    seg = Segmenter.from_pretrained(out, device="cpu")
    answer = seg(synthref_root / "images" / "synthref_val_000000.png", "Please segment the red circle.", keep_tokens=8)
    assert "<mt_" not in answer.text and all(m.shape == (128, 128) for m in answer.masks)


@pytest.mark.slow
def test_latency_benchmark_puts_himtok_beside_stamp(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys

    from tiny import tiny_model

    model, proc = tiny_model(seed=3)
    Segmenter(model, proc).save_pretrained(tmp_path / "stamp")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("latency_benchmark", root / "benchmarks" / "latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "latency.json"
    monkeypatch.setattr(sys, "argv", ["latency.py", "--model", str(tmp_path / "stamp"), "--himtok-model", str(tmp_path / "none"),
                                      "--tokenizer", str(tmp_path / "none"), "--image", str(root / "examples" / "synthref_0.png"),
                                      "--repeats", "1", "--json", str(out)])
    bench.main()
    result = json.loads(out.read_text())["himtok"]
    assert "RANDOMLY INITIALISED" in result["source"] and "RANDOMLY INITIALISED" in capsys.readouterr().out
    assert result["mask_tokens"] == 32 and result["codes_match"] and result["mask_ms_kv_cache"] > 0


def test_steerability_benchmark_measures_shifts_at_text_and_code_inputs(himtok, tokenizer_dir, synthref_root, tmp_path,
                                                                      monkeypatch, capsys):
    import importlib.util
    import sys

    from tiny import tiny_model

    model, proc = himtok
    model.save_pretrained(tmp_path / "himtok")
    proc.save_pretrained(tmp_path / "himtok")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("steerability_benchmark", root / "benchmarks" / "steerability.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "steer.json"
    result = bench.main(["--model", str(tmp_path / "himtok"), "--data", str(synthref_root), "--samples", "3",
                         "--scales", "0", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result and len(result["rows"]) == 2 * len(bench.SITES)
    for row in result["rows"]:
        assert row["kl"] >= -1e-6 and row["kl_lm"] >= -1e-6 and 0 <= row["argmax_changed"] <= 1
        if row["scale"] == 0:  # no shift, no change
            assert abs(row["kl"]) < 1e-4 and row["argmax_changed"] == 0
    assert any(row["kl"] > 0 for row in result["rows"])
    parts = {r["part"]: r for r in result["logit_parts"]}
    assert set(parts) == {"lm", "readout", "lm + readout"}
    assert parts["readout"]["centred_std"] == 0  # this model has no readout: decoding reads the LM alone
    assert parts["lm"]["ce"] == parts["lm + readout"]["ce"] > 0 and 0 <= parts["lm"]["accuracy"] <= 1
    out_text = capsys.readouterr().out
    assert "KL per code" in out_text and "centred std" in out_text
    # with a patch readout, decoding's logits are the LM's plus the readout's, and both parts are reported
    read, read_proc = _model(tokenizer_dir, seed=4, patch_readout=True)
    _randomise_readout(read)
    Segmenter(read, read_proc).save_pretrained(tmp_path / "readout")
    result = bench.main(["--model", str(tmp_path / "readout"), "--data", str(synthref_root), "--samples", "3",
                         "--scales", "2", "--json", str(out)])
    parts = {r["part"]: r for r in result["logit_parts"]}
    assert parts["readout"]["centred_std"] > 0 and parts["lm"]["ce"] != parts["lm + readout"]["ce"]
    assert any(row["kl"] != row["kl_lm"] for row in result["rows"])

    stamp, stamp_proc = tiny_model(seed=3)
    Segmenter(stamp, stamp_proc).save_pretrained(tmp_path / "stamp")
    with pytest.raises(SystemExit, match="'stamp' head; this measures HiMTok models"):
        bench.main(["--model", str(tmp_path / "stamp"), "--data", str(synthref_root), "--json", str(out)])


# -- the codebook adapter ------------------------------------------------------------------------------------
def _adapted(tokenizer_dir: Path, seed: int = 0, model_options: dict | None = None):
    torch.manual_seed(seed)
    config = tiny_config("himtok", model_options, tokenizer=str(tokenizer_dir), codebook_adapter=True)
    model, proc = build_model(config, build_tokenizer(config, CORPUS, vocab_size=300))
    return model.eval(), proc


def _randomise_adapter(model) -> None:
    with torch.no_grad():
        model.head.adapter.embed.weight.normal_()
        model.head.adapter.predict.weight.normal_()


def test_codebook_adapter_starts_silent_then_adds_the_code_geometry(himtok, tokenizer_dir):
    plain, proc = himtok
    adapted, _ = _adapted(tokenizer_dir)
    missing, _ = adapted.load_state_dict(plain.state_dict(), strict=False)  # same backbone; the adapter stays zero
    assert missing and all(k.startswith("head.adapter.") for k in missing)
    batch = _batch(proc, plain.head, _square_mask())
    with torch.no_grad():
        torch.manual_seed(0)
        expected_loss = plain(batch)["loss"]
        torch.manual_seed(0)
        torch.testing.assert_close(adapted(batch)["loss"], expected_loss)

        _randomise_adapter(adapted)
        head, output, embedding = adapted.head, adapted.lm.get_output_embeddings(), adapted.lm.get_input_embeddings()
        codebook = head.mask_tokenizer.quantizer.normalized_codebook()
        h = torch.randn(2, output.in_features)
        expected = h @ output.weight.t()
        expected[:, head.code_token_ids] += head.adapter.predict(h) @ codebook.t()
        torch.testing.assert_close(output(h), expected)
        ids = torch.tensor([[int(head.code_token_ids[5]), proc.seg_token_id]])
        torch.testing.assert_close(embedding(ids)[0, 1], embedding.weight[proc.seg_token_id])  # text: untouched
        torch.testing.assert_close(embedding(ids)[0, 0], embedding.weight[ids[0, 0]] + head.adapter.embed(codebook[5]))


@pytest.mark.parametrize("part", ["codebook_adapter", "patch_readout", "mask_readout", "readout_query"])
def test_learned_code_parts_round_trip(tokenizer_dir, tmp_path, part):
    options = {part: True, "patch_readout": True} if part == "readout_query" else {part: True}
    model, proc = _model(tokenizer_dir, seed=1, **options)
    {"codebook_adapter": _randomise_adapter, "patch_readout": _randomise_readout,
     "mask_readout": _randomise_mask_readout, "readout_query": _randomise_readout}[part](model)
    batch = _batch(proc, model.head, _square_mask())
    Segmenter(model, proc).save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert getattr(loaded.head.config, part)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(batch)["loss"]
        torch.manual_seed(0)
        torch.testing.assert_close(loaded(batch)["loss"], expected)


def test_the_shaper_takes_over_a_gated_adapted_model_unchanged(tokenizer_dir):
    """The shaper model reuses the HiMTok model's parts: its gate and codebook adapter act exactly once (the HiMTok
    model's hooks are removed, the shaper's added), so the text loss is unchanged."""
    from mmseg.modeling.heads.shaper import shaper_from_himtok

    model, proc = _adapted(tokenizer_dir, seed=2,
                           model_options={"image_position": "after", "ground_layer": 1, "ground_gate": True})
    _randomise_adapter(model)
    with torch.no_grad():
        model.grounder.focus.normal_(0, 3.0)
    batch = _batch(proc, model.head, _square_mask())
    with torch.no_grad():
        before = model(batch)["text_ce"]
        shaper = shaper_from_himtok(model, proc).eval()
        torch.testing.assert_close(shaper(batch)["text_ce"], before)
    assert shaper.grounder is model.grounder
    assert len(model.lm.get_output_embeddings()._forward_hooks) == 1
    assert len(model.lm.get_decoder().layers[0]._forward_hooks) == 1


def test_code_input_noise_corrupts_inputs_only(tokenizer_dir):
    model, proc = _model(tokenizer_dir, code_input_noise=1.0)
    head = model.head
    ids, labels = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    torch.manual_seed(0)
    new_ids, new_labels = head.expand_targets(ids, labels, _square_mask())
    start = new_ids.index(head.mt_start_id)
    true_codes = head.mask_tokenizer.encode(_square_mask()).tolist()
    assert [head._code_of[t] for t in new_labels[start + 1 : start + 1 + K]] == true_codes  # labels stay true
    inputs = [head._code_of[t] for t in new_ids[start + 1 : start + 1 + K]]
    assert sum(a != b for a, b in zip(inputs, true_codes)) > K // 2  # inputs are random codes (a few may coincide)
    assert new_ids[start] == head.mt_start_id and new_ids[start + K + 1] == head.mt_end_id
    assert new_ids[:start] == ids[:start] and new_labels[:start] == labels[:start]


def test_code_input_noise_is_keyed_by_the_samples_generator(tokenizer_dir):
    """The trainer hands each sample a generator seeded by step and sample: the same seed gives the same swaps
    whatever the global RNG did, another seed other swaps."""
    import random

    model, proc = _model(tokenizer_dir, code_input_noise=0.5)
    ids, labels = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    torch.manual_seed(0)
    first = model.head.expand_targets(ids, labels, _square_mask(), rng=random.Random(7))
    torch.manual_seed(1)
    again = model.head.expand_targets(ids, labels, _square_mask(), rng=random.Random(7))
    other = model.head.expand_targets(ids, labels, _square_mask(), rng=random.Random(8))
    assert first == again
    assert first[0] != other[0] and first[1] == other[1]  # other inputs, same labels


def test_host_targets_encode_with_a_host_copy_that_moving_the_model_leaves_behind(himtok):
    """Loader workers build HiMTok targets; with the model on an accelerator they use a CPU copy of the tokenizer."""
    model, _ = himtok
    head = model.head
    head._code_cache.clear()
    try:
        head.host_targets()
        host = head._host_tokenizer[0]
        assert all(host is not m for m in model.modules())  # outside the module tree: .to(device) skips it
        assert not any(p is q for p in host.parameters() for q in model.parameters())
        mask = _square_mask()
        assert head.codes_of(mask) == head.mask_tokenizer.encode(mask).tolist()
        head.to(torch.float64)  # a stand-in for a move to an accelerator
        assert next(host.parameters()).dtype == torch.float32 and next(head.mask_tokenizer.parameters()).dtype == torch.float64
    finally:
        head.to(torch.float32)
        head._host_tokenizer = None
        head._code_cache.clear()


# -- the patch readout -----------------------------------------------------------------------------------------
def _randomise_readout(model) -> None:
    with torch.no_grad():
        for p in model.head.readout.up.parameters():
            p.normal_()


def test_patch_readout_starts_silent_and_trains(himtok, tokenizer_dir):
    plain, proc = himtok
    model, _ = _model(tokenizer_dir, patch_readout=True)
    missing, _ = model.load_state_dict(plain.state_dict(), strict=False)  # same backbone; the readout stays zero
    assert missing and all(k.startswith("head.readout.") for k in missing)
    batch = _batch(proc, plain.head, _square_mask())
    expected, got = losses_under_one_seed(batch, plain, model)
    for key in ("text_ce", "mask_bce", "mask_dice", "mask_prefix"):
        torch.testing.assert_close(got[key], expected[key])
    # readout_ce is the code-token CE of the logits decoding uses (here the LM's own: the readout is still zero)
    assert 0 < float(got["readout_ce"]) and torch.isfinite(got["readout_ce"])
    model.train()
    _randomise_readout(model)
    model(batch)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.readout.parameters())


def _constrained_step(model, proc, fed_codes: int):
    """One ``constrain`` call after ``<mt_start>`` and ``fed_codes`` codes, on random prompt states: returns
    ``(logits in (1, V), logits out (1, V), prompt ids (1, T), prompt hidden states (1, T, D))``."""
    head = model.head
    codes = head.code_token_ids.tolist()
    prompt = torch.tensor([proc.encode_chat([{"role": "user", "content": "the red circle"}])[0]])
    hidden = torch.randn(1, prompt.shape[1], model.lm.config.hidden_size)
    session = SimpleNamespace(tokens=[[head.mt_start_id, *codes[:fed_codes]]], batch_size=1,
                              device=torch.device("cpu"), state={}, prompt_ids=prompt, prompt_hidden=hidden)
    logits = torch.randn(1, max(codes) + 1)
    with torch.no_grad():
        return logits, head.constrain(session, logits), prompt, hidden


def test_patch_readout_joins_the_code_logits_when_decoding(tokenizer_dir):
    model, proc = _model(tokenizer_dir, seed=3, patch_readout=True)
    _randomise_readout(model)
    head = model.head
    logits, out, prompt, hidden = _constrained_step(model, proc, 2)
    readout = head.readout_logits(prompt, hidden)  # (1, K, V): the third code is predicted from row 2
    assert readout.shape == (1, K, CODES) and readout.abs().sum() > 0
    torch.testing.assert_close(out[0, head.code_token_ids], logits[0, head.code_token_ids] + readout[0, 2])
    # end to end: exactly K in-vocabulary codes, a mask decoded, and the readout changes which codes are chosen
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(head, "constrain", _opening_constrain(head, proc.eos_token_id))
    torch.manual_seed(0)
    with_readout = _generate(model, proc, ["the red circle"]).tokens[0]
    with torch.no_grad():
        head.readout.up.weight.zero_()
        head.readout.up.bias.zero_()
    torch.manual_seed(0)
    without = _generate(model, proc, ["the red circle"]).tokens[0]
    monkeypatch.undo()
    assert with_readout[K + 1] == head.mt_end_id and all(t in head._code_of for t in with_readout[1 : K + 1])
    assert with_readout[1 : K + 1] != without[1 : K + 1]


@pytest.mark.parametrize("option", ["patch_readout", "mask_readout", "readout_query", "readout_queries"])
def test_the_shaper_keeps_the_readouts(tokenizer_dir, option):
    """A shaper built on a HiMTok model with a readout reads the same code logits: readout weights carried over, the
    same readout_ce on a batch, and the readout joins the shaper's own code logits when it decodes."""
    from mmseg.modeling.heads.shaper import shaper_from_himtok

    options = {option: True, "patch_readout": True} if option.startswith("readout_") else {option: True}
    if option == "readout_queries":
        options["readout_query"] = True
    model, proc = _model(tokenizer_dir, seed=5, **options)
    part = {"patch_readout": "readout", "mask_readout": "mask_readout", "readout_query": "answer_gate",
            "readout_queries": "queries"}[option]
    {"mask_readout": _randomise_mask_readout}.get(option, _randomise_readout)(model)
    batch = _batch(proc, model.head, _square_mask())
    with torch.no_grad():
        torch.manual_seed(0)
        before = model(batch)["readout_ce"]
        shaper = shaper_from_himtok(model, proc).eval()
        torch.manual_seed(0)
        torch.testing.assert_close(shaper(batch)["readout_ce"], before)
    for a, b in zip(getattr(shaper.head, part).parameters(), getattr(model.head, part).parameters()):
        torch.testing.assert_close(a, b)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(shaper.head, "constrain", _opening_constrain(shaper.head, proc.eos_token_id))
    torch.manual_seed(0)
    gen = _generate(shaper, proc, ["the red circle"], invoke="entropy")
    monkeypatch.undo()
    assert gen.tokens[0][K + 1] == shaper.head.mt_end_id and len(gen.masks[0]) == 1


def test_patch_readout_reads_a_merged_image_prefix(tokenizer_dir, tmp_path):
    """With ``image_merge`` 2 the LM prefix holds (gh/2)*(gw/2) image positions: the readout is built for that many,
    trains, joins decoding, survives save/load, and a shaper built on the model carries it."""
    from mmseg.modeling.heads.shaper import shaper_from_himtok

    torch.manual_seed(2)
    config = tiny_config("himtok", {"image_merge": 2}, tokenizer=str(tokenizer_dir), patch_readout=True)
    model, proc = build_model(config, build_tokenizer(config, CORPUS, vocab_size=300))
    gh, gw = model.vision.grid_size
    assert model.prefix_grid == (gh // 2, gw // 2) and model.head.readout.patches == gh * gw // 4
    _randomise_readout(model)
    batch = _batch(proc, model.head, _square_mask())
    model.train()
    out = model(batch)
    assert torch.isfinite(out["readout_ce"])
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.readout.parameters())
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    loaded, _ = load_pretrained(tmp_path / "ckpt")
    for a, b in zip(loaded.head.readout.parameters(), model.head.readout.parameters()):
        torch.testing.assert_close(a, b)
    shaper = shaper_from_himtok(model, proc)
    assert shaper.head.readout.patches == model.head.readout.patches
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(loaded.head, "constrain", _opening_constrain(loaded.head, proc.eos_token_id))
    gen = _generate(loaded, proc, ["the red circle"])
    monkeypatch.undo()
    assert gen.tokens[0][K + 1] == loaded.head.mt_end_id and len(gen.masks[0]) == 1


# -- the mask readout ------------------------------------------------------------------------------------------
def _randomise_mask_readout(model) -> None:
    with torch.no_grad():
        model.head.mask_readout.paint.weight.normal_(0, 0.5)
        model.head.mask_readout.log_scale.fill_(0.2)  # scale e^2


def test_mask_readout_reads_the_coarse_mask_through_the_frozen_encoder(tokenizer_dir):
    """The terms are scale * cos(encoder latents of the coarse mask, codebook): exactly the scores whose argmax is
    the tokenizer's own nearest-code encoding of that mask."""
    model, proc = _model(tokenizer_dir, seed=6, mask_readout=True)
    _randomise_mask_readout(model)
    head = model.head
    gh, gw = model.prefix_grid
    prompt = torch.tensor([proc.encode_chat([{"role": "user", "content": "the red circle"}])[0]] * 2)
    hidden = torch.randn(2, prompt.shape[1], model.lm.config.hidden_size)
    with torch.no_grad():
        terms, coarse, gate = head._readouts(prompt, hidden)
        assert gate is None
        assert coarse.shape == (2, gh * 4, gw * 4) and terms.shape == (2, K, CODES)
        tokenizer = head.mask_tokenizer
        expected = head.mask_readout.scale * (F.normalize(tokenizer.encode_latents(coarse.sigmoid()), dim=-1)
                                              @ tokenizer.quantizer.normalized_codebook().t())
        torch.testing.assert_close(terms, expected)
        torch.testing.assert_close(head.readout_logits(prompt, hidden), terms)
        # its best codes are the quantizer's nearest codes for that coarse mask
        _, nearest, _ = tokenizer.quantizer(tokenizer.encode_latents(coarse.sigmoid()))
    assert torch.equal(terms.argmax(-1), nearest)


def test_mask_readout_trains_densely_and_leaves_the_tokenizer_frozen(tokenizer_dir):
    model, proc = _model(tokenizer_dir, seed=7, mask_readout=True)
    _randomise_mask_readout(model)
    batch = _batch(proc, model.head, _square_mask())
    model.train()
    out = model(batch)
    assert torch.isfinite(out["readout_ce"]) and float(out["readout_mask"].detach()) > 0
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.mask_readout.parameters())
    assert all(p.grad is None for p in model.head.mask_tokenizer.parameters())
    # no mask in the batch: the terms are still in the graph (distributed training keeps every parameter used)
    model.zero_grad()
    none = _batch(proc, model.head, _square_mask())
    none["seg_positions"].fill_(-1)
    out = model(none)
    assert float(out["readout_mask"].detach()) == 0 and float(out["readout_ce"].detach()) == 0
    out["loss"].backward()


def test_mask_readout_joins_decoding(tokenizer_dir):
    model, proc = _model(tokenizer_dir, seed=8, mask_readout=True)
    _randomise_mask_readout(model)
    head = model.head
    logits, out, prompt, hidden = _constrained_step(model, proc, 3)
    with torch.no_grad():
        terms = head.readout_logits(prompt, hidden)
    torch.testing.assert_close(out[0, head.code_token_ids], logits[0, head.code_token_ids] + terms[0, 3])


@pytest.mark.parametrize(("option", "value", "message"), [("mask_readout_upsample", 0, "mask_readout_upsample"),
                                                          ("mask_readout_scale", 0.0, "mask_readout_scale")])
def test_mask_readout_rejects_bad_options(tokenizer_dir, option, value, message):
    with pytest.raises(ValueError, match=message):
        _model(tokenizer_dir, mask_readout=True, **{option: value})


# -- the answer-gated readout ----------------------------------------------------------------------------------
def _gated(tokenizer_dir, seed: int = 9):
    model, proc = _model(tokenizer_dir, seed=seed, patch_readout=True, readout_query=True)
    _randomise_readout(model)
    return model, proc


def test_answer_gate_reads_the_mask_point_state(tokenizer_dir):
    """The gated readout's terms depend on the <mt_start> state (the query) and need it: a clear error without."""
    model, proc = _gated(tokenizer_dir)
    head = model.head
    prompt = torch.tensor([proc.encode_chat([{"role": "user", "content": "the red circle"}])[0]] * 2)
    hidden = torch.randn(2, prompt.shape[1], model.lm.config.hidden_size)
    query = torch.randn(2, model.lm.config.hidden_size)
    with torch.no_grad():
        terms, coarse, gate = head._readouts(prompt, hidden, query)
        gh, gw = model.prefix_grid
        assert terms.shape == (2, K, CODES) and coarse is None and gate.shape == (2, gh * gw)
        image = hidden[prompt == head.image_token_id].view(2, -1, hidden.shape[-1])
        torch.testing.assert_close(gate, head.answer_gate(query, image))
        other = head.readout_logits(prompt, hidden, query.flip(0))
    assert not torch.allclose(other, terms)
    with pytest.raises(ValueError, match="readout_query"):
        head.readout_logits(prompt, hidden)


def test_answer_gate_trains_densely_against_the_target_cells(tokenizer_dir):
    model, proc = _gated(tokenizer_dir)
    batch = _batch(proc, model.head, _square_mask())
    model.train()
    out = model(batch)
    assert float(out["readout_gate"].detach()) > 0 and torch.isfinite(out["readout_ce"])
    out["loss"].backward()
    for part in (model.head.answer_gate, model.head.readout):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    # no mask in the batch: the gate's term is zero and its parameters stay in the graph (distributed training)
    gate = model.head.answer_gate
    model.zero_grad()
    none = _batch(proc, model.head, _square_mask())
    none["seg_positions"].fill_(-1)
    out = model(none)
    assert float(out["readout_gate"].detach()) == 0
    out["loss"].backward()  # every parameter still in the graph
    assert all(p.grad is not None for p in gate.parameters())


def test_answer_gated_readout_joins_decoding_per_mask_point(tokenizer_dir):
    """constrain adds the readout read with the row's latest <mt_start> state; a new mask point reads it afresh."""
    model, proc = _gated(tokenizer_dir)
    head = model.head
    codes = head.code_token_ids.tolist()
    prompt = torch.tensor([proc.encode_chat([{"role": "user", "content": "the red circle"}])[0]])
    d = model.lm.config.hidden_size
    hidden = torch.randn(1, prompt.shape[1], d)
    first, second = torch.randn(d), torch.randn(d)
    session = SimpleNamespace(tokens=[[head.mt_start_id, *codes[:2]]], batch_size=1, device=torch.device("cpu"),
                              state={}, prompt_ids=prompt, prompt_hidden=hidden, point_hidden=[[first]])
    logits = torch.randn(1, max(codes) + 1)
    with torch.no_grad():
        out = head.constrain(session, logits)
        expected = head.readout_logits(prompt, hidden, first[None])[0, 2]
        torch.testing.assert_close(out[0, head.code_token_ids], logits[0, head.code_token_ids] + expected)
        # a second mask in the same answer: its own <mt_start> state
        session.tokens[0] += [*codes[2:K], head.mt_end_id, head.mt_start_id]
        session.point_hidden[0].append(second)
        out = head.constrain(session, logits)
        expected = head.readout_logits(prompt, hidden, second[None])[0, 0]
    torch.testing.assert_close(out[0, head.code_token_ids], logits[0, head.code_token_ids] + expected)
    # end to end through generate: K in-vocabulary codes and a mask
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(head, "constrain", _opening_constrain(head, proc.eos_token_id))
    gen = _generate(model, proc, ["the red circle", "the blue square"])
    monkeypatch.undo()
    for row in range(2):
        assert gen.tokens[row][K + 1] == head.mt_end_id and len(gen.masks[row]) == 1


def test_readout_query_needs_the_patch_readout(tokenizer_dir):
    with pytest.raises(ValueError, match="patch_readout"):
        _model(tokenizer_dir, readout_query=True)
    with pytest.raises(ValueError, match="readout_query_dim"):
        _model(tokenizer_dir, patch_readout=True, readout_query=True, readout_query_dim=0)


# -- code_text_ce ----------------------------------------------------------------------------------------------
def test_code_text_ce_off_leaves_the_codes_to_the_readout(tokenizer_dir):
    """Off, the text CE scores the words and the span markers but no code token; the codes are still scored by
    readout_ce, and the other terms are those of the same weights with the option on."""
    on, proc = _model(tokenizer_dir, seed=9, patch_readout=True)
    off, _ = _model(tokenizer_dir, seed=9, patch_readout=True, code_text_ce=False)
    off.load_state_dict(on.state_dict())
    head = off.head
    batch = _batch(proc, head, _square_mask())
    labels = batch["labels"]
    kept = head.text_labels(labels)
    is_code = head.code_index[labels.clamp(min=0)] >= 0
    assert int(is_code.sum()) == 2 * K  # the two target answers' codes
    assert (kept[is_code] == -100).all() and torch.equal(kept[~is_code], labels[~is_code])
    assert (kept == head.mt_start_id).sum() == 2 and (kept == head.mt_end_id).sum() == 2
    assert torch.equal(on.head.text_labels(labels), labels)
    a, b = losses_under_one_seed(batch, on, off)
    assert a["text_ce"] != b["text_ce"]
    for key in ("readout_ce", "mask_bce", "mask_dice"):
        torch.testing.assert_close(a[key], b[key])


def test_readout_ce_weight_scales_that_term_only(tokenizer_dir):
    plain, proc = _model(tokenizer_dir, seed=9, patch_readout=True)
    light, _ = _model(tokenizer_dir, seed=9, patch_readout=True, readout_ce_weight=0.3)
    light.load_state_dict(plain.state_dict())
    batch = _batch(proc, plain.head, _square_mask())
    a, b = losses_under_one_seed(batch, plain, light)
    assert float(a["readout_ce"]) > 0
    torch.testing.assert_close(b["readout_ce"], 0.3 * a["readout_ce"])
    for key in ("text_ce", "mask_bce", "mask_dice"):
        torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ValueError, match="readout_ce_weight must be >= 0"):
        _model(tokenizer_dir, patch_readout=True, readout_ce_weight=-1.0)


def test_code_text_ce_off_needs_a_readout(tokenizer_dir):
    with pytest.raises(ValueError, match="code_text_ce false"):
        _model(tokenizer_dir, code_text_ce=False)


# -- mask queries as the readouts' source ----------------------------------------------------------------------
def _assert_maskless_batch_keeps(model, proc, part: torch.nn.Module, term: str) -> None:
    """With no mask in the batch, ``term`` is zero and every parameter of ``part`` is still in the graph (distributed
    training needs every parameter to receive a gradient, even a zero one)."""
    model.zero_grad()
    none = _batch(proc, model.head, _square_mask())
    none["seg_positions"].fill_(-1)
    out = model(none)
    assert float(out[term].detach()) == 0
    out["loss"].backward()
    assert all(p.grad is not None for p in part.parameters())


def _queried(tokenizer_dir, seed: int = 9):
    model, proc = _model(tokenizer_dir, seed=seed, patch_readout=True, readout_query=True, readout_queries=True)
    _randomise_readout(model)
    return model, proc


def test_query_readout_trains_every_part_from_the_queries(tokenizer_dir):
    """The gate and the readout read one mask query per vision patch (the full grid): both train, the queries'
    own parameters included; with no mask in the batch every term is zero and every parameter stays in the graph."""
    model, proc = _queried(tokenizer_dir)
    head = model.head
    assert head.readout_grid == model.vision.grid_size and head.queries.patches == model.vision.grid_size[0] ** 2
    model.train()
    out = model(_batch(proc, head, _square_mask()))
    assert float(out["readout_gate"].detach()) > 0 and torch.isfinite(out["readout_ce"])
    out["loss"].backward()
    for part in (head.queries, head.answer_gate, head.readout):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    _assert_maskless_batch_keeps(model, proc, head.queries, "readout_gate")


def test_query_readout_decodes_as_it_was_trained(tokenizer_dir, monkeypatch):
    """The mask queries run mid-decoding at <mt_start> give the same hidden states (so the same code terms) as
    the teacher-forced training pass over the same prompt and <mt_start>."""
    model, proc = _queried(tokenizer_dir)
    head = model.head
    seen = []
    original = head.session_queries
    monkeypatch.setattr(head, "session_queries", lambda s, rows: seen.append(original(s, rows)) or seen[-1])
    monkeypatch.setattr(head, "constrain", _opening_constrain(head, proc.eos_token_id))
    prompt = proc.encode_chat([{"role": "user", "content": "the red circle"}])[0]
    pixels = torch.randn(1, 3, 64, 64)
    gen = generate(model, [prompt], pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                   max_new_tokens=4)
    assert gen.tokens[0][K + 1] == head.mt_end_id and len(seen) == 1  # read once per mask point
    ids = torch.tensor([prompt + [head.mt_start_id]])
    batch = {"seg_positions": torch.tensor([len(prompt)]), "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        embeds, features = model.embed_inputs(ids, pixels)
        hidden = model.text_hidden(embeds, ids, batch["attention_mask"], head.extra_inputs(batch, features))
    torch.testing.assert_close(seen[0], hidden[:, ids.shape[1]:], atol=1e-4, rtol=1e-4)


def test_query_readout_options_and_inputs_fail_clearly(tokenizer_dir):
    with pytest.raises(ValueError, match="readout_queries"):
        _model(tokenizer_dir, readout_queries=True)
    model, proc = _queried(tokenizer_dir)
    prompt = torch.tensor([proc.encode_chat([{"role": "user", "content": "the red circle"}])[0]])
    hidden = torch.randn(1, prompt.shape[1], model.lm.config.hidden_size)
    with pytest.raises(ValueError, match="mask queries"):
        model.head.readout_logits(prompt, hidden, hidden[:, -1])
    plain, _ = _gated(tokenizer_dir)
    with pytest.raises(ValueError, match="not mask queries"):
        plain.head.readout_logits(prompt, hidden, hidden[:, -1], image=torch.randn(1, 64, hidden.shape[-1]))


# -- the mask refiner ------------------------------------------------------------------------------------------
def _refining(tokenizer_dir, seed: int = 9):
    model, proc = _model(tokenizer_dir, seed=seed, refine_channels=8)
    with torch.no_grad():  # as training would leave it: a non-zero residual
        model.head.refiner.fuse[-1].weight.normal_(0, 0.5)
    return model, proc


def test_a_new_refiner_changes_nothing_and_a_trained_one_reads_the_image(tokenizer_dir):
    model, _ = _model(tokenizer_dir, refine_channels=8)
    head = model.head
    probs = torch.softmax(torch.randn(2, K, CODES) * 3, -1)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = head.decode_probs(probs)
        torch.testing.assert_close(head.decode_probs(probs, pixel_values=pixels), plain)
        head.refiner.fuse[-1].weight.normal_(0, 0.5)
        refined = head.decode_probs(probs, pixel_values=pixels)
        other = head.decode_probs(probs, pixel_values=pixels.flip(-1))
    assert refined.shape == plain.shape and not torch.allclose(refined, plain) and not torch.allclose(refined, other)
    with pytest.raises(ValueError, match="images"):
        head.refiner(plain, pixels[:1])
    with pytest.raises(ValueError, match="refine_channels"):
        _model(tokenizer_dir, refine_channels=-1)


def test_the_refiner_trains_through_the_full_decode_loss(tokenizer_dir):
    """The mask loss scores the refined full decode (what decoding returns), so the refiner trains; with no mask in
    the batch its parameters stay in the graph (distributed training)."""
    model, proc = _refining(tokenizer_dir)
    head = model.head
    batch = _batch(proc, head, _square_mask())
    model.train()
    out = model(batch)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.refiner.parameters())
    _assert_maskless_batch_keeps(model, proc, head.refiner, "mask_bce")


def test_decoding_refines_each_mask_against_its_own_image(tokenizer_dir, monkeypatch, tmp_path):
    model, proc = _refining(tokenizer_dir)
    head = model.head
    monkeypatch.setattr(head, "constrain", _opening_constrain(head, proc.eos_token_id))
    prompts = [proc.encode_chat([{"role": "user", "content": q}])[0] for q in ("the red circle", "the blue square")]
    pixels = torch.randn(2, 3, 64, 64)
    gen = generate(model, prompts, pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                   max_new_tokens=4)
    # each refined mask is the unrefined decode of the same soft codes, refined against the row's own image
    refiner, head.refiner = head.refiner, None
    try:
        plain = generate(model, prompts, pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                         max_new_tokens=4)
    finally:
        head.refiner = refiner
    for row in range(2):
        assert gen.tokens[row] == plain.tokens[row]
        with torch.no_grad():
            expected = head.refiner(plain.masks[row][0].logits[None], pixels[row:row + 1])[0]
        torch.testing.assert_close(gen.masks[row][0].logits, expected, atol=1e-4, rtol=1e-4)
    # refine_mask=False per call: the tokenizer's own decode; anything but a bool is a clear error
    raw = generate(model, prompts, pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                   max_new_tokens=4, options={"refine_mask": False})
    for row in range(2):
        torch.testing.assert_close(raw.masks[row][0].logits, plain.masks[row][0].logits)
    with pytest.raises(ValueError, match="refine_mask must be"):
        generate(model, prompts, pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                 options={"refine_mask": "no"})
    Segmenter(model, proc).save_pretrained(tmp_path)
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu").model.head
    for a, b in zip(loaded.refiner.parameters(), head.refiner.parameters()):
        torch.testing.assert_close(a, b)


def test_refine_mask_is_offered_only_by_a_head_that_refines(himtok, tokenizer_dir):
    model, proc = himtok  # refine_channels 0: nothing to switch off, so the option would silently do nothing
    assert model.head.refiner is None and "refine_mask" not in Segmenter(model, proc).head_options
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['refine_mask'\] for the himtok head; valid: keep_tokens"):
        model.head.check_options({"refine_mask": False})
    refining, proc = _model(tokenizer_dir, refine_channels=8)
    assert Segmenter(refining, proc).head_options == ("keep_tokens", "refine_mask")
