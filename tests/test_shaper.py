"""The shaper head: HiMTok decoding steered by latent reasoning (condenser, thought, translator, shaper, invoker),
its two training stages through ``mmseg train``, persistence and errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmseg.generation import DecodeSession, generate
from mmseg.modeling.heads.shaper import ShaperHead, shaper_from_himtok
from mmseg.modeling.shaper import PolicyInvoker, entropy_rounds, group_advantages, invoker_features, reinforce_loss
from mmseg.predictor import Segmenter
from test_himtok_head import K, _model, _opening_constrain, _write_tokenizer
from tiny import tiny_model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return _write_tokenizer(tmp_path_factory.mktemp("himt") / "mask_tokenizer")


@pytest.fixture(scope="module")
def pair(tokenizer_dir):
    """A tiny HiMTok model and a shaper on the SAME parts (no copy), with non-zero control strengths so that a
    shaping round changes something."""
    himtok, proc = _model(tokenizer_dir, seed=2)
    shaper = shaper_from_himtok(himtok, proc).eval()
    _wake(shaper)
    return himtok, shaper, proc


def _wake(shaper, strengths: tuple[float, ...] = (1.0, -0.5, 2.0, 1.5)) -> None:
    """Give an untrained shaper (zero last control layer) a non-zero shift, as training would."""
    torch.manual_seed(11)
    with torch.no_grad():
        shaper.head.control.mlp[-1].reset_parameters()
        shaper.head.control.strengths.copy_(torch.tensor(strengths))


@pytest.fixture()
def forced(pair, monkeypatch):
    """Both models open one mask at once and stop after it (an untrained LM would not by itself)."""
    himtok, shaper, proc = pair
    for model in (himtok, shaper):
        monkeypatch.setattr(model.head, "constrain", _opening_constrain(model.head, proc.eos_token_id))
    return himtok, shaper, proc


def _generate(model, proc, queries, pixels=None, **options):
    prompts = [proc.encode_chat([{"role": "user", "content": q}])[0] for q in queries]
    pixels = torch.randn(len(queries), 3, 64, 64, generator=torch.Generator().manual_seed(0)) if pixels is None else pixels
    return generate(model, prompts, pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                    max_new_tokens=4, options=options)


QUERIES = ["the red circle", "a much longer query about the blue star on the left"]


# -- HiMTok unchanged when the shaper stays silent ----------------------------------------------------------
def test_never_gives_exactly_the_himtok_outputs(forced):
    himtok, shaper, proc = forced
    base, never = _generate(himtok, proc, QUERIES), _generate(shaper, proc, QUERIES, invoke="never")
    assert never.tokens == base.tokens and never.text_tokens == base.text_tokens
    for row in range(len(QUERIES)):
        a, b = base.masks[row][0], never.masks[row][0]
        assert torch.equal(a.logits, b.logits)
        assert b.info == {**a.info, "invoke": "never", "invocations": 0, "invoked_at": []}
    # the same through the public API, per call
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    x, y = Segmenter(himtok, proc)(image, "the red one"), Segmenter(shaper, proc)(image, "the red one", invoke="never")
    assert x.text == y.text and np.array_equal(x.logits[0], y.logits[0])


def test_never_gives_exactly_the_outputs_of_a_himtok_model_with_every_part(tokenizer_dir, monkeypatch):
    """A HiMTok model with the query readout, the answer gate and the mask refiner (trained, here randomised): the
    shaper carries every part over, so a silent shaper still returns exactly its masks."""
    himtok, proc = _model(tokenizer_dir, seed=2, patch_readout=True, readout_query=True, readout_queries=True,
                          refine_channels=4)
    with torch.no_grad():
        for p in (*himtok.head.readout.up.parameters(), *himtok.head.refiner.fuse[-1].parameters()):
            p.normal_()
    base_head = himtok.head
    monkeypatch.setattr(base_head, "constrain", _opening_constrain(base_head, proc.eos_token_id))
    base = _generate(himtok, proc, QUERIES)
    shaper = shaper_from_himtok(himtok, proc).eval()
    monkeypatch.setattr(shaper.head, "constrain", _opening_constrain(shaper.head, proc.eos_token_id))
    never = _generate(shaper, proc, QUERIES, invoke="never")
    assert never.tokens == base.tokens
    for row in range(len(QUERIES)):
        assert torch.equal(base.masks[row][0].logits, never.masks[row][0].logits)


@pytest.mark.parametrize("options", [{}, {"steer_codes": True}])
def test_an_untrained_shaper_changes_nothing_even_when_invoked(tokenizer_dir, monkeypatch, options):
    """The control MLP's last layer (and the code steer) start at zero: training starts exactly from HiMTok's
    behaviour."""
    himtok, proc = _model(tokenizer_dir, seed=2)
    shaper = shaper_from_himtok(himtok, proc, options).eval()
    for model in (himtok, shaper):
        monkeypatch.setattr(model.head, "constrain", _opening_constrain(model.head, proc.eos_token_id))
    base, always = _generate(himtok, proc, QUERIES), _generate(shaper, proc, QUERIES, invoke="always")
    assert always.tokens == base.tokens and always.masks[0][0].info["invocations"] > 0
    torch.testing.assert_close(always.masks[0][0].logits, base.masks[0][0].logits, atol=1e-4, rtol=1e-4)


# -- the re-run -----------------------------------------------------------------------------------------------
def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    return [(k.clone(), v.clone()) for k, v in zip(cache.key_cache, cache.value_cache)]  # older transformers


def test_shaping_replaces_the_kv_entries_of_one_position(forced, monkeypatch):
    _, shaper, proc = forced
    records = []
    original = DecodeSession.replace_last

    def spy(session, embeds):
        before, length = _layers(session.cache), session.cache_length
        out = original(session, embeds)
        records.append((length, session.cache_length, before, _layers(session.cache)))
        return out

    monkeypatch.setattr(DecodeSession, "replace_last", spy)
    gen = _generate(shaper, proc, QUERIES[:1], invoke="always")
    assert len(records) == gen.masks[0][0].info["invocations"] == len(shaper.head.checkpoints()[:4])
    for length, after_length, before, after in records:
        assert after_length == length  # the cache did not grow
        for (k0, v0), (k1, v1) in zip(before, after):
            assert k1.shape == k0.shape and v1.shape == v0.shape
            assert torch.equal(k1[..., :-1, :], k0[..., :-1, :]) and torch.equal(v1[..., :-1, :], v0[..., :-1, :])
        assert any(not torch.allclose(k1[..., -1, :], k0[..., -1, :]) for (k0, _), (k1, _) in zip(before, after))
    never = _generate(shaper, proc, QUERIES[:1], invoke="never")
    assert not torch.allclose(gen.masks[0][0].logits, never.masks[0][0].logits)  # shaping changed the decoding


def test_info_reports_the_invocations_at_checkpoints(forced):
    _, shaper, proc = forced
    head = shaper.head
    assert head.checkpoints() == [3, 7, 11, 15, 19, 23, 27]  # check_every=4; never the last code
    gen = _generate(shaper, proc, QUERIES, invoke="always")
    for row in range(2):
        info = gen.masks[row][0].info
        assert info["invoke"] == "always" and info["invocations"] == 4 and info["invoked_at"] == [3, 7, 11, 15]
        assert len(info["mask_tokens"]) == K and "policy_trace" not in info
        assert gen.text_tokens[row][0] == proc.seg_token_id


def test_shaped_batches_equal_one_at_a_time(forced):
    _, shaper, proc = forced
    seg = Segmenter(shaper, proc)
    images = [Image.new("RGB", (40, 40), (200, 0, 0)), Image.new("RGB", (60, 30), (0, 0, 200))]
    convs = [[{"role": "user", "content": q}] for q in QUERIES]
    both = seg.batch(convs, images, invoke="entropy")
    for i in range(2):
        one = seg.chat(convs[i], images[i], invoke="entropy")
        assert one.info == both[i].info
        np.testing.assert_allclose(one.logits[0], both[i].logits[0], atol=1e-3, rtol=1e-3)


# -- the invoker ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["always", "entropy", "learned"])
def test_the_invocation_cap_holds(tokenizer_dir, monkeypatch, mode):
    himtok, proc = _model(tokenizer_dir, seed=2)
    # an eager configuration: every checkpoint (each token) wants several rounds
    shaper = shaper_from_himtok(himtok, proc, {"check_every": 1, "max_invocations": 3, "entropy_low": 0.0,
                                               "entropy_high": 1e-6, "entropy_max_rounds": 2}).eval()
    monkeypatch.setattr(shaper.head, "constrain", _opening_constrain(shaper.head, proc.eos_token_id))
    _wake(shaper, (0.5, 0.5, 0.5, 0.5))
    with torch.no_grad():
        shaper.head.policy.mlp[-1].bias.fill_(10.0)  # the learned policy always says invoke
    gen = _generate(shaper, proc, QUERIES, invoke=mode)
    for row in range(2):
        info = gen.masks[row][0].info
        assert info["invocations"] == 3 == len(info["invoked_at"])
    expected = {"always": [0, 1, 2], "entropy": [0, 0, 1], "learned": [0, 1, 2]}[mode]  # entropy: 2 rounds at 0
    assert gen.masks[0][0].info["invoked_at"] == expected
    sampled = _generate(shaper, proc, QUERIES, invoke="learned", sample_seed=1)
    trace = sampled.masks[0][0].info["policy_trace"]
    assert len(trace) == 3 and all(t["invoke"] for t in trace) and sampled.masks[0][0].info["invocations"] == 3


def test_entropy_rule_follows_cntp():
    h = torch.tensor([0.0, 0.3, 0.58, 0.6, 0.8, 1.0])
    assert entropy_rounds(h, 0.3, 0.8, 2).tolist() == [0, 0, 1, 1, 2, 2]  # n = 1 + 2 * clamp((H - .3) / .5)
    assert entropy_rounds(h, 0.3, 0.8, 1).tolist() == [0, 0, 1, 1, 1, 1]


def test_invoker_features():
    f = invoker_features([0.2, 0.5, 0.4], entropy=0.9, window=2)
    torch.testing.assert_close(f, torch.tensor([0.4, -0.1, 0.0025, 0.9]))
    torch.testing.assert_close(invoker_features([0.3], 0.1, 4), torch.tensor([0.3, 0.0, 0.0, 0.1]))
    # the answer's confidence, scaled into [-1, 0] and clipped at a log-probability of -10
    torch.testing.assert_close(invoker_features([0.3], 0.1, 4, confidence=-2.0),
                               torch.tensor([0.3, 0.0, 0.0, 0.1, -0.2]))
    torch.testing.assert_close(invoker_features([0.3], 0.1, 4, confidence=-2.0, wrong=0.7),
                               torch.tensor([0.3, 0.0, 0.0, 0.1, -0.2, 0.7]))
    assert float(invoker_features([0.3], 0.1, 4, confidence=-25.0)[-1]) == -1.0


def test_the_learned_invoker_reads_the_answers_confidence(tokenizer_dir):
    """``policy_confidence``: the policy's fifth input is the lowest log-probability of the answer's words before
    ``<mt_start>``, under the distributions that chose them (a teacher-forced pass gives the same)."""
    himtok, proc = _model(tokenizer_dir, seed=2)
    shaper = shaper_from_himtok(himtok, proc, {"policy_confidence": True}).eval()
    _wake(shaper)
    assert shaper.head.policy.mlp[0].in_features == 5
    words = proc.encode_model_text("the red circle")[:2]
    shaper.head.constrain = _words_then_mask(shaper.head, proc, words)
    prompt = proc.encode_chat([{"role": "user", "content": QUERIES[0]}])[0]
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gen = generate(shaper, [prompt], pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                   max_new_tokens=4, options={"invoke": "learned", "sample_seed": 0})
    trace = gen.masks[0][0].info["policy_trace"]
    assert trace and all(len(d["features"]) == 5 for d in trace)
    ids = torch.tensor([prompt + words])
    with torch.no_grad():
        embeds, _ = shaper.embed_inputs(ids, pixels)
        hidden = shaper.text_hidden(embeds, ids, torch.ones_like(ids), None)
        logp = torch.log_softmax(shaper.lm.get_output_embeddings()(hidden[0, len(prompt) - 1 : -1]).float(), -1)
    lowest = float(logp.gather(1, torch.tensor(words)[:, None]).min())
    assert -10.0 < lowest < 0.0  # inside the feature's range, so the comparison below means something
    for decision in trace:  # one value for the whole span
        assert decision["features"][4] == pytest.approx(max(lowest, -10.0) / 10.0, abs=1e-4)


def test_one_policy_gradient_step_favours_the_rewarded_action():
    torch.manual_seed(0)
    policy = PolicyInvoker(hidden=8)
    state = torch.tensor([[0.3, 0.05, 0.01, 0.7]])
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    for rewarded, direction in ((1.0, 1), (0.0, -1)):
        before = float(policy.probability(state).detach())
        # one query, a group of 4 rollouts with one decision each: two invoked, two did not
        actions = torch.tensor([1.0, 0.0, 1.0, 0.0])
        rewards = torch.where(actions == rewarded, 1.0, 0.0)[None]  # (1, 4)
        advantages = group_advantages(rewards)[0]
        assert advantages.sum().abs() < 1e-6  # the group mean is the baseline
        loss = reinforce_loss(policy, state.expand(4, -1), actions, advantages, rollouts=4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = float(policy.probability(state).detach())
        assert (after - before) * direction > 1e-3, (rewarded, before, after)


def test_policy_input_normalisation_is_exact_saved_and_off_by_default():
    torch.manual_seed(0)
    features = torch.randn(50, 6) * torch.tensor([0.03, 0.016, 3e-4, 0.18, 0.02, 0.36]) + 0.5
    plain = PolicyInvoker(hidden=8, num_features=6)
    assert not any("feature" in k for k in plain.state_dict())  # checkpoints before the option load unchanged
    policy = PolicyInvoker(hidden=8, num_features=6, normalize=True)
    policy.mlp.load_state_dict(plain.mlp.state_dict())
    assert torch.equal(policy(features), plain(features))  # identity until stage 2 observes decisions
    for chunk in (features[:1], features[1:20], features[20:]):  # batches of any size merge exactly
        policy.observe(chunk)
    x = features.double()
    assert torch.allclose(policy.feature_mean, x.mean(0)) and float(policy.feature_count) == 50
    standardised = policy.standardized(features)
    assert torch.allclose(standardised.double(), (x - x.mean(0)) / x.std(0), atol=1e-5)
    assert torch.allclose(standardised.std(0), torch.ones(6), atol=1e-4)  # every feature on one scale
    plain.observe(features)  # a no-op without the option
    assert torch.equal(plain(features), policy.mlp(features).squeeze(-1))
    reloaded = PolicyInvoker(hidden=8, num_features=6, normalize=True)
    reloaded.load_state_dict(policy.state_dict())  # the statistics travel with the weights
    assert torch.equal(reloaded(features), policy(features))


def test_a_half_precision_checkpoint_keeps_the_invokers_statistics_exact(tokenizer_dir, tmp_path):
    """save_pretrained(dtype=bf16) halves the weights but keeps float64 statistics float64: a count of 300,001
    decisions in bf16 would read 299,008."""
    from mmseg.modeling.builder import load_pretrained

    himtok, proc = _model(tokenizer_dir, seed=2)
    shaper = shaper_from_himtok(himtok, proc, {"policy_normalize": True, "invoke": "learned"})
    policy = shaper.head.policy
    policy.observe(torch.randn(300_001, policy.feature_mean.numel()) * 0.03 + 0.5)
    Segmenter(shaper, proc).save_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = load_pretrained(tmp_path)[0].head.policy
    for name in ("feature_count", "feature_mean", "feature_m2"):
        assert getattr(loaded, name).dtype == torch.float64 and torch.equal(getattr(loaded, name), getattr(policy, name))
    assert not torch.equal(loaded.mlp[0].weight, policy.mlp[0].weight)  # the weights did go through bf16
    torch.testing.assert_close(loaded.mlp[0].weight, policy.mlp[0].weight, atol=1e-2, rtol=1e-2)


def test_policy_rollouts_force_the_answer_up_to_the_mask(pair, synthref_root):
    """Stage 2 trains the mask-token decoding: the answer text is forced up to <mt_start> (generate's
    answer_prefix), so even an untrained model opens a mask and the sampled policy decides at its checkpoints."""
    from mmseg.data.refer import ReferDataset
    from mmseg.data.prompts import TARGET_ANSWER
    from mmseg.generation import answer_prefix_ids
    from mmseg.train_shaper import rollouts

    _, shaper, proc = pair
    prefix = answer_prefix_ids(proc, TARGET_ANSWER, shaper.head.mask_point_token_id)
    assert prefix[-1] == shaper.head.mt_start_id and proc.seg_token_id not in prefix
    # a backbone trained on two-step relational answers gets its whole first step forced too
    two_step = "The red star is at the top right, and the star left of it is the blue star at the top <seg>."
    prefix = answer_prefix_ids(proc, two_step, shaper.head.mask_point_token_id)
    assert prefix[-1] == shaper.head.mt_start_id and "left of it is the blue star" in proc.decode(prefix[:-1])
    gen = _generate(shaper, proc, QUERIES, invoke="never")
    assert all(not masks for masks in gen.masks)  # left alone, the untrained LM opens no mask
    data = ReferDataset(synthref_root, "synthref", "unc", "train")
    samples = [data[0], data[1]]
    answers, baseline = rollouts(shaper, proc, samples, ["Segment it."] * 2, group=3, seed=0)
    assert [len(group) for group in answers] == [3, 3] and len(baseline) == 2
    for sample, group, base in zip(samples, answers, baseline):
        assert base.info[0]["invocations"] == 0 and base.masks[0].shape == sample.mask.shape
        for answer in group:
            trace = answer.info[0]["policy_trace"]
            assert [t["index"] for t in trace][:1] == [3] and answer.info[0]["invocations"] == sum(t["invoke"] for t in trace)
    # decisions are sampled: the three rollouts of one query do not all agree
    decisions = [tuple(t["invoke"] for t in a.info[0]["policy_trace"]) for group in answers for a in group]
    assert len(set(decisions)) > 1


def test_rewards_subtract_the_no_invoke_iou_and_the_cost():
    from mmseg.train_shaper import policy_batch

    target = np.zeros((4, 4), bool)
    target[:2] = True

    def answer(rows: int, invocations: int, decisions: list[bool]):
        mask = np.zeros((4, 4), bool)
        mask[:rows] = True
        trace = [{"features": [0.1 * i, 0.0, 0.0, 0.5], "invoke": d} for i, d in enumerate(decisions)]
        return SimpleNamespace(masks=[mask], info=[{"invocations": invocations, "policy_trace": trace}])

    group = [answer(2, 1, [True, False]), answer(4, 0, [False, False])]  # IoU 1.0 with 1 call; IoU 0.5 with none
    features, actions, advantages, stats = policy_batch([group], [answer(3, 0, [])], [target], cost=0.1,
                                                        device=torch.device("cpu"))
    base = 2 / 3
    rewards = torch.tensor([1.0 - base - 0.1, 0.5 - base])
    assert stats["reward"] == pytest.approx(float(rewards.mean())) and stats["iou_never"] == pytest.approx(base)
    assert actions.tolist() == [1.0, 0.0, 0.0, 0.0] and features.shape == (4, 4)
    expected = (rewards - rewards.mean()).repeat_interleave(2)
    torch.testing.assert_close(advantages, expected)


# -- options and errors -----------------------------------------------------------------------------------------
def test_bad_options_and_config_are_clear_errors(forced, tokenizer_dir):
    _, shaper, proc = forced
    seg = Segmenter(shaper, proc)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="unknown invoke mode 'sometimes'; valid: never, always, entropy, learned"):
        seg(image, "the red one", invoke="sometimes")
    with pytest.raises(ValueError, match="sample_seed must be a whole number"):
        seg(image, "the red one", sample_seed=-1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['keep_token'\] for the shaper head"):
        seg(image, "the red one", keep_token=3)
    answer = seg(image, "the red one", invoke="always", keep_tokens=8)
    assert answer.info[0]["keep_tokens"] == 8 and answer.info[0]["invocations"] == 4
    himtok, proc2 = _model(tokenizer_dir, seed=2)
    with pytest.raises(ValueError, match="unknown invoke mode 'maybe'"):
        shaper_from_himtok(himtok, proc2, {"invoke": "maybe"})
    with pytest.raises(ValueError, match="check_every must be >= 1"):
        shaper_from_himtok(himtok, proc2, {"check_every": 0})
    with pytest.raises(ValueError, match="own_answers must be >= 0"):
        shaper_from_himtok(himtok, proc2, {"own_answers": -1})
    with pytest.raises(ValueError, match="own_answers: expected int"):
        shaper_from_himtok(himtok, proc2, {"own_answers": 2.5})
    with pytest.raises(ValueError, match=r"own_mismatch_share must be in \[0, 1\]"):
        shaper_from_himtok(himtok, proc2, {"own_mismatch_share": 1.5})
    with pytest.raises(ValueError, match="mismatch_probe reads the request and the answer's words"):
        shaper_from_himtok(himtok, proc2, {"mismatch_probe": True})
    with pytest.raises(ValueError, match=r"policy_mismatch_share must be in \[0, 1\]"):
        shaper_from_himtok(himtok, proc2, {"policy_mismatch_share": -0.1})
    with pytest.raises(ValueError, match="starts from a himtok model"):
        shaper_from_himtok(tiny_model()[0], proc2)


# -- persistence --------------------------------------------------------------------------------------------------
def test_save_and_from_pretrained_give_identical_answers(forced, tmp_path, monkeypatch):
    _, shaper, proc = forced
    with torch.no_grad():
        shaper.head.policy.mlp[-1].bias.fill_(0.3)
    seg = Segmenter(shaper, proc)
    seg.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["model"]["head"]
    assert config["name"] == "shaper" and config["invoke"] == "learned" and config["num_tokens"] == K
    loaded = Segmenter.from_pretrained(tmp_path, device="cpu")
    assert isinstance(loaded.model.head, ShaperHead)
    monkeypatch.setattr(loaded.model.head, "constrain", _opening_constrain(loaded.model.head, proc.eos_token_id))
    for name, p in shaper.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    image = Image.new("RGB", (48, 40), (0, 0, 255))
    try:
        for options in ({}, {"invoke": "always"}, {"invoke": "entropy"}, {"invoke": "learned", "sample_seed": 5}):
            a, b = seg(image, "the blue one", **options), loaded(image, "the blue one", **options)
            assert a.text == b.text and a.info == b.info and np.array_equal(a.logits[0], b.logits[0]), options
        assert a.info[0]["invocations"] > 0
    finally:
        with torch.no_grad():  # the module's shared model goes back to an untrained policy
            shaper.head.policy.mlp[-1].bias.zero_()


# -- training -----------------------------------------------------------------------------------------------------
def _words_then_mask(head, proc, words: list[int]):
    """A constrain that forces the answer ``words``, then ``<mt_start>`` (the head's own constrain picks the codes),
    and ``eos`` after ``<mt_end>``."""
    plain = type(head).constrain.__get__(head)

    def constrain(session, logits):
        logits = logits.clone()
        for row, tokens in enumerate(session.tokens):
            n = len(tokens)
            forced = words[n] if n < len(words) else head.mt_start_id if n == len(words) else \
                proc.eos_token_id if tokens[-1] == head.mt_end_id else None
            if forced is not None:
                logits[row] = -1e9
                logits[row, forced] = 0.0
        return plain(session, logits)

    return constrain


def _shaped_rollout(shaper, proc, query: str, monkeypatch):
    """Decode ``query`` with ``invoke="always"``, recording every input shift the head computes; returns the generation,
    the shifts in order, and the teacher-forced batch of the same answer (for the stage-1 objective)."""
    shifts = []
    original = shaper.head.shift

    def record(*args):
        out = original(*args)
        shifts.append(out[0])
        return out

    monkeypatch.setattr(shaper.head, "shift", record)
    pixels = torch.randn(1, 3, 64, 64)
    prompt = proc.encode_chat([{"role": "user", "content": query}])[0]
    gen = generate(shaper, [prompt], pixels, eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
                   max_new_tokens=4, options={"invoke": "always"})
    answer = gen.tokens[0] + [proc.eos_token_id]
    ids = torch.tensor([prompt + answer])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
             "labels": torch.tensor([[-100] * len(prompt) + answer]), "mask_targets": torch.zeros(1, 64, 64),
             "seg_positions": torch.tensor([len(prompt) + answer.index(shaper.head.mt_start_id)])}
    return gen, shifts, batch


@pytest.mark.parametrize("memory_text", [False, True])
def test_stage_one_objective_matches_inference_and_trains_only_the_shaper(forced, monkeypatch, memory_text):
    """The teacher-forced states equal the ones decoding collects: the shift computed in training for mask token i
    is the one inference adds there (with ``memory_text``, the long memory's text states too: the request and the
    answer's words). Gradients reach the shaper's parts, never the frozen model."""
    from mmseg.train_shaper import ShapingObjective, freeze_for

    _, shaper, proc = forced
    monkeypatch.setattr(shaper.head, "config", dataclasses.replace(shaper.head.config, memory_text=memory_text))
    if memory_text:  # the memory the condenser reads: image positions, then every text position before the span
        words = proc.encode_model_text("the red circle")[:2]  # answer words before <mt_start>, whose states it holds
        monkeypatch.setattr(shaper.head, "constrain", _words_then_mask(shaper.head, proc, words))
        sizes = []
        long = shaper.head.condense_long.forward
        monkeypatch.setattr(shaper.head.condense_long, "forward",
                            lambda states, valid: sizes.append(valid.sum(1).tolist()) or long(states, valid))
    _, shifts, batch = _shaped_rollout(shaper, proc, QUERIES[1], monkeypatch)
    inference_shift = shifts[0]  # at mask token 3, before any other shaping
    objective = ShapingObjective(shaper)
    freeze_for(shaper, 1)
    try:
        losses = objective(batch, torch.tensor([3]))
        torch.testing.assert_close(shifts[-1], inference_shift, atol=1e-4, rtol=1e-3)
        if memory_text:  # decoding's first round and training's: the same number of memory states
            start = int(batch["seg_positions"][0])  # every position before it is the image or text
            assert start == int((batch["labels"][0] == -100).sum()) + len(words)  # the words precede the span
            assert sizes[0] == sizes[-1] == [start + 5]  # + <mt_start> and codes 0..3
        assert set(losses) == {"shaped_ce", "mask_bce", "mask_dice", "mask_prefix", "loss", "base_ce"}
        assert all(torch.isfinite(v) for v in losses.values())
        shaper.zero_grad()
        losses["loss"].backward()
        for name, p in shaper.named_parameters():
            trained = name.startswith(("head.condense_short", "head.condense_long", "head.translator", "head.control"))
            assert (p.grad is not None) == trained, name
        assert shaper.head.control.strengths.grad.abs().sum() > 0
        assert shaper.head.condense_long.queries.grad.abs().sum() > 0  # through the frozen LM's latent thought
        with torch.no_grad():  # a zero shift leaves the teacher-forced CE where HiMTok has it
            shaper.head.control.strengths.zero_()
            zero = objective(batch, torch.tensor([3]))
        torch.testing.assert_close(zero["shaped_ce"], zero["base_ce"])
    finally:
        shaper.zero_grad()
        shaper.requires_grad_(True)
        _wake(shaper)


@pytest.mark.parametrize("own", [False, True])
def test_stage_one_code_inputs_are_the_collators_or_the_models_own(forced, monkeypatch, own):
    """``own_code_inputs``: the states the shaper reads (and the shaped pass) come from a pass whose code inputs are
    the frozen model's own choices in the collator's pass, argmax of its code logits (LM + readout); everything
    else in the sequence is unchanged. Off: the collator's inputs throughout."""
    from mmseg.train_shaper import ShapingObjective

    _, shaper, proc = forced
    head, model = shaper.head, shaper
    _, _, batch = _shaped_rollout(shaper, proc, QUERIES[1], monkeypatch)
    s, k = int(batch["seg_positions"][0]), head.num_tokens
    inputs = slice(s + 1, s + 1 + k)  # where the K code inputs sit
    batch["input_ids"][0, inputs] = head.code_token_ids[torch.arange(k) * 7 % head.codebook_size]  # not the model's
    monkeypatch.setattr(head, "config", dataclasses.replace(head.config, own_code_inputs=own))
    calls = []
    original = model.text_hidden

    def record(embeds, ids, *args):
        out = original(embeds, ids, *args)
        calls.append((ids.clone(), out.detach()))
        return out

    monkeypatch.setattr(model, "text_hidden", record)
    with torch.no_grad():
        losses = ShapingObjective(shaper)(batch, torch.tensor([3]))
    assert torch.isfinite(losses["loss"])
    collator = batch["input_ids"]
    assert len(calls) == (3 if own else 2)  # (own: the model's codes,) then the shaped pass
    assert torch.equal(calls[0][0], collator)
    if not own:
        assert torch.equal(calls[1][0], collator)
        return
    t = collator.shape[1]
    hidden = calls[0][1][:, :t]
    logits = model.lm.get_output_embeddings()(hidden[0, s : s + k]).index_select(-1, head.code_token_ids).float()
    readout = head.readout_logits(collator, hidden, hidden[:, s], calls[0][1][:, t:] if head.queries is not None else None)
    if readout is not None:
        logits = logits + readout[0]
    expected = collator.clone()
    expected[0, inputs] = head.code_token_ids[logits.argmax(-1)]
    assert not torch.equal(expected, collator)
    assert torch.equal(calls[1][0], expected) and torch.equal(calls[2][0], expected)


def test_an_untrained_shaper_leaves_its_zero_start_on_the_first_step(tokenizer_dir, monkeypatch):
    """The zero sits in the control MLP's LAST layer, behind live features: its first gradient is already non-zero
    (with zero strengths in front of random vectors instead, every part's gradient is a product with a zero or with
    noise, and stage 1 never left the start)."""
    from mmseg.train_shaper import ShapingObjective, freeze_for

    himtok, proc = _model(tokenizer_dir, seed=2)
    shaper = shaper_from_himtok(himtok, proc).eval()
    control = shaper.head.control
    assert control.mlp[-1].weight.abs().sum() == 0 and torch.equal(control.strengths, torch.ones_like(control.strengths))
    monkeypatch.setattr(shaper.head, "constrain", _opening_constrain(shaper.head, proc.eos_token_id))
    _, _, batch = _shaped_rollout(shaper, proc, QUERIES[1], monkeypatch)
    batch["mask_targets"][:, 10:40, 20:50] = 1
    freeze_for(shaper, 1)
    ShapingObjective(shaper)(batch, torch.tensor([3]))["loss"].backward()
    assert control.mlp[-1].weight.grad.abs().sum() > 0 and control.mlp[-1].bias.grad.abs().sum() > 0


def test_the_mismatch_probe_scales_the_rounds_in_decoding_and_training_alike(tokenizer_dir, monkeypatch):
    """``mismatch_probe``: read once at ``<mt_start>`` from the long memory (image, request, the answer's words), its
    probability scales every round and is reported in ``info``; stage 1 computes the same probability and shift from
    the same states, trains the probe with BCE against ``words_wrong``, and a probe sure the words are right leaves
    the mask exactly as never-invoke draws it."""
    from mmseg.train_shaper import ShapingObjective, freeze_for

    himtok, proc = _model(tokenizer_dir, seed=2)
    shaper = shaper_from_himtok(himtok, proc, {"memory_text": True, "mismatch_probe": True, "steer_codes": True}).eval()
    _wake(shaper)
    head = shaper.head
    with torch.no_grad():  # an untrained probe says 0.5 everywhere; give it an opinion
        head.mismatch.body[-1].weight.normal_(0.0, 0.5)
    words = proc.encode_model_text("the red circle")[:2]
    monkeypatch.setattr(head, "constrain", _words_then_mask(head, proc, words))
    probes = []
    mismatch_logits = head.mismatch_logits
    monkeypatch.setattr(head, "mismatch_logits", lambda *a: probes.append(mismatch_logits(*a)) or probes[-1])
    gen, shifts, batch = _shaped_rollout(shaper, proc, QUERIES[1], monkeypatch)
    info = gen.masks[0][0].info
    wrong = float(torch.sigmoid(probes[0][0]))
    assert len(probes) == 1 and info["words_wrong"] == pytest.approx(wrong, abs=1e-4) and 0.05 < wrong < 0.95
    assert shaper.head.policy.mlp[0].in_features == 5  # the probability is an invoker input
    batch["words_wrong"] = torch.tensor([True])
    freeze_for(shaper, 1)
    try:
        losses = ShapingObjective(shaper)(batch, torch.tensor([3]))
        torch.testing.assert_close(probes[-1], probes[0], atol=1e-4, rtol=1e-3)  # the same read at <mt_start>
        torch.testing.assert_close(shifts[-1], shifts[0], atol=1e-4, rtol=1e-3)  # the same scaled shift
        expected = torch.nn.functional.binary_cross_entropy_with_logits(probes[-1], torch.ones(1))
        torch.testing.assert_close(losses["mismatch_bce"], expected)
        shaper.zero_grad()
        losses["mismatch_bce"].backward()
        assert head.mismatch.body[-1].weight.grad.abs().sum() > 0 and head.condense_long.queries.grad.abs().sum() > 0
        assert head.control.mlp[-1].weight.grad is None  # the shift's parts learn from the shaped CE only
    finally:
        shaper.zero_grad()
        shaper.requires_grad_(True)
    with torch.no_grad():  # sure the words are right: every round scaled to nothing
        head.mismatch.body[-1].bias.fill_(-60.0)
    always = _generate(shaper, proc, QUERIES[:1], invoke="always")
    never = _generate(shaper, proc, QUERIES[:1], invoke="never")
    assert always.masks[0][0].info["invocations"] == 4 and always.masks[0][0].info["words_wrong"] < 1e-20
    assert always.tokens == never.tokens and torch.equal(always.masks[0][0].logits, never.masks[0][0].logits)


def test_steer_start_shapes_at_mt_start_in_decoding_and_training_alike(forced, monkeypatch):
    """``steer_start`` adds a checkpoint at ``<mt_start>`` (index -1): decoding shapes there first, and the stage-1
    objective at point -1 computes the same shift from the same states and trains every code after it."""
    from mmseg.train_shaper import ShapingObjective

    _, shaper, proc = forced
    head = shaper.head
    monkeypatch.setattr(head, "config", dataclasses.replace(head.config, steer_start=True))
    assert head.checkpoints() == [-1, 3, 7, 11, 15, 19, 23, 27]
    gen, shifts, batch = _shaped_rollout(shaper, proc, QUERIES[0], monkeypatch)
    assert gen.masks[0][0].info["invoked_at"] == [-1, 3, 7, 11]  # the cap of 4 reached at code 11
    with torch.no_grad():
        losses = ShapingObjective(shaper)(batch, torch.tensor([-1]))
    torch.testing.assert_close(shifts[-1], shifts[0], atol=1e-4, rtol=1e-3)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["shaped_ce"] != losses["base_ce"]
    never = _generate(shaper, proc, QUERIES[:1], invoke="never")
    assert never.masks[0][0].info["invoked_at"] == []


def test_stage_one_objective_under_bf16_autocast(forced):
    """The mixed-precision path of the real presets (the hierarchical loss's blur runs in bf16 under autocast)."""
    from mmseg.train_shaper import ShapingObjective

    _, shaper, proc = forced
    head = shaper.head
    ids, labels = proc.encode_chat([{"role": "user", "content": "the red circle"}], "Sure, <seg>.")
    mask = torch.zeros(64, 64)
    mask[10:40, 5:30] = 1
    ids, labels = head.expand_targets(ids, labels, mask)
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.tensor([labels]), "pixel_values": torch.randn(1, 3, 64, 64), "mask_targets": mask[None],
             "seg_positions": torch.tensor([ids.index(head.mt_start_id)])}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = ShapingObjective(shaper)(batch, torch.tensor([7]))
    assert all(torch.isfinite(v.float()) for v in losses.values()) and losses["mask_prefix"] > 0


def _himtok_checkpoint(tokenizer_dir: Path, folder: Path) -> Path:
    model, proc = _model(tokenizer_dir, seed=3)
    Segmenter(model, proc).save_pretrained(folder)
    return folder


def _preset(tmp_path: Path, init_from: str | None, **head) -> Path:
    head = {"name": "shaper", **({"init_from": init_from} if init_from is not None else {}), "policy_steps": 2,
            "policy_batch": 2, "policy_group": 2, "invoke_cost": 0.05, **head}
    train = {"batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "max_steps": 2, "eval_every": 1000, "eval_samples": 2,
             "save_every": 1000, "log_every": 1, "mixed_precision": "no"}
    path = tmp_path / "shaper.json"
    path.write_text(json.dumps({"model": {"head": head}, "train": train}))
    return path


@pytest.mark.slow
def test_both_stages_run_through_mmseg_train_and_resume(synthref_root, tokenizer_dir, tmp_path):
    from mmseg.cli import main

    ckpt = _himtok_checkpoint(tokenizer_dir, tmp_path / "himtok")
    preset = _preset(tmp_path, str(ckpt))
    out = tmp_path / "shaper"
    args = ["train", "--config", str(preset), "--data", str(synthref_root), "--out", str(out)]
    assert main([*args, "--max-steps", "1"]) == 0  # one step of each stage
    progress = json.loads((out / "train_state" / "progress.json").read_text())
    assert (progress["stage"], progress["step"], progress["stage1_steps"]) == (2, 1, 1)
    first = Segmenter.from_pretrained(out, device="cpu").model.head
    assert main(args) == 0  # resumes in stage 2 (a finished stage is not reopened): its second step
    progress = json.loads((out / "train_state" / "progress.json").read_text())
    assert (progress["stage"], progress["step"], progress["stage1_steps"]) == (2, 2, 1)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    one = [h for h in history if h["stage"] == 1 and "loss" in h]
    two = [h for h in history if h["stage"] == 2 and "reward" in h]
    assert [h["step"] for h in one] == [1] and [h["step"] for h in two] == [2, 3]
    assert all(np.isfinite(h["shaped_ce"]) and np.isfinite(h["base_ce"]) for h in one)
    assert all(h["decisions"] > 0 for h in two)  # the answer is forced to open the mask: the policy decides
    assert any("val_ciou_always" in h for h in history) and any("val_ciou_learned" in h for h in history)
    assert (out / "curve.png").is_file() and (out / "mask_tokenizer" / "mask_tokenizer_config.json").is_file()
    seg = Segmenter.from_pretrained(out, device="cpu")
    head = seg.model.head
    assert isinstance(head, ShaperHead) and head.options()["init_from"] == str(ckpt)
    assert head.control.mlp[-1].weight.abs().sum() > 0  # stage 1 moved the shaper off zero
    assert any(not torch.equal(a, b) for a, b in zip(head.policy.parameters(), first.policy.parameters()))
    himtok = Segmenter.from_pretrained(ckpt, device="cpu").model
    for name, p in himtok.lm.state_dict().items():  # the backbone stayed frozen
        assert torch.equal(seg.model.lm.state_dict()[name], p), name
    answer = seg(synthref_root / "images" / "synthref_val_000000.png", "Please segment the red circle.", invoke="always")
    assert "<mt_" not in answer.text
    # the benchmark on the trained checkpoint: HiMTok alone and every invoke mode, on val and testB
    bench = _benchmark()
    result = bench.main(["--model", str(out), "--data", str(synthref_root), "--limit", "2", "--precision", "fp32",
                         "--json", str(tmp_path / "shaper.json")])
    assert json.loads((tmp_path / "shaper.json").read_text()) == json.loads(json.dumps(result))
    runs = result["runs"]
    assert list(runs) == ["himtok", "shaper never", "shaper always", "shaper entropy", "shaper learned"]
    for split in ("val", "testB"):
        assert runs["shaper never"][split]["ciou"] == runs["himtok"][split]["ciou"]  # never is plain HiMTok
        assert runs["shaper never"][split]["invocations_per_mask"] == 0 and runs["himtok"][split]["n"] == 2
        assert all(0 <= runs[name][split]["giou"] <= 1 and runs[name][split]["ms_per_query"] > 0 for name in runs)
        ceiling = result["ceilings"][split]  # recomputed from the runs' masks: never's must match its run
        assert ceiling["never"] == pytest.approx(runs["shaper never"][split]["ciou"])
        assert ceiling["best_per_sentence"] >= max(runs[f"shaper {m}"][split]["ciou"] for m in ("always", "entropy")) - 1e-12
        gain = result["learned_minus_never"][split]
        assert gain["difference"] == pytest.approx(runs["shaper learned"][split]["ciou"] - ceiling["never"])
        assert gain["ci95_low"] <= gain["ci95_high"] and gain["sentences"] == 2


def _benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shaper.py"
    spec = importlib.util.spec_from_file_location("shaper_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_invoker_ceilings():
    ceilings = _benchmark().ceilings
    # three sentences: shaping helps the first (a misnamed one), hurts the second, changes nothing on the third
    never = np.array([[10, 100], [90, 100], [0, 0]], dtype=float)
    always = np.array([[60, 100], [50, 120], [0, 0]], dtype=float)
    entropy = np.array([[40, 100], [90, 100], [0, 0]], dtype=float)
    out = ceilings({"never": never, "always": always, "entropy": entropy}, np.array([True, False, False]))
    assert out["never"] == pytest.approx(100 / 200) and out["misnamed"] == 1
    assert out["best_per_sentence"] == pytest.approx(150 / 200)  # always on the first, never (or entropy) after
    assert out["always_where_misnamed"] == pytest.approx(150 / 200)
    assert out["entropy_where_misnamed"] == pytest.approx(130 / 200)
    # the ceiling maximises the cIoU, not each sentence's IoU: always has the better IoU on the first sentence
    # (50/55 against 90/100) but fewer pixels right, which costs the pooled ratio
    never = np.array([[90, 100], [700, 1000]], dtype=float)
    always = np.array([[50, 55], [700, 1000]], dtype=float)
    out = ceilings({"never": never, "always": always, "entropy": never}, np.array([False, False]))
    assert out["best_per_sentence"] == pytest.approx(790 / 1100) and 790 / 1100 > 750 / 1055


def test_the_benchmarks_paired_bootstrap():
    paired_bootstrap = _benchmark().paired_bootstrap
    rng = np.random.default_rng(0)
    union = rng.integers(50, 150, size=(400, 1)).astype(float)
    base = np.hstack([union * rng.uniform(0.3, 0.9, size=(400, 1)), union])
    same = paired_bootstrap(base, base)
    assert same["difference"] == 0 and same["ci95_low"] == same["ci95_high"] == 0 and same["share_positive"] == 0
    better = base + np.array([5.0, 0.0])  # 5 more pixels right on every sentence: a gain every resample sees
    out = paired_bootstrap(better, base)
    assert out["difference"] == pytest.approx(2000 / base[:, 1].sum())
    assert 0 < out["ci95_low"] <= out["difference"] <= out["ci95_high"] and out["share_positive"] == 1.0
    # a gain on one sentence in 400 and a loss on another: the interval straddles zero
    mixed = base.copy()
    mixed[0, 0] += 30
    mixed[1, 0] -= 25
    wide = paired_bootstrap(mixed, base)
    assert wide["ci95_low"] < 0 < wide["ci95_high"] and paired_bootstrap(mixed, base) == wide  # seeded: repeatable


def test_the_benchmarks_mismatch_probe_figures():
    bench = _benchmark()
    # four sentences: two misnamed (the probe says 0.95 and 0.6), one named (0.7), one without a target (no mask)
    never = np.array([[0, 100], [10, 100], [90, 100], [0, 0]], dtype=float)
    always = np.array([[80, 100], [20, 100], [40, 100], [0, 0]], dtype=float)
    misnamed = np.array([True, True, False, False])
    described = np.array([True, True, True, False])
    wrong = np.array([0.95, 0.6, 0.7, np.nan])
    out = bench.probe_figures({"never": never, "always": always}, misnamed, described, wrong)
    assert out["probe_auroc"] == pytest.approx(0.5)  # 0.95 ranks above the named 0.7, 0.6 below it
    assert out["always_where_probe_0.5"] == pytest.approx((80 + 20 + 40) / 300)
    assert out["always_where_probe_0.9"] == pytest.approx((80 + 10 + 90) / 300) and out["shaped_where_probe_0.9"] == 1
    assert bench.auroc(np.array([0.9, 0.8, 0.1]), np.array([True, True, False])) == pytest.approx(1.0)
    assert bench.auroc(np.array([0.9, 0.8]), np.array([True, True])) is None  # one class only


def test_the_benchmark_refuses_anything_but_a_trained_shaper(tmp_path, synthref_root, tokenizer_dir, capsys):
    bench = _benchmark()
    out = tmp_path / "shaper.json"
    common = ["--data", str(synthref_root), "--json", str(out)]
    with pytest.raises(SystemExit, match="no shaper checkpoint at .*mmseg train --config tiny-shaper"):
        bench.main(["--model", str(tmp_path / "nowhere"), *common])
    himtok = _himtok_checkpoint(tokenizer_dir, tmp_path / "himtok")
    with pytest.raises(SystemExit, match="is a 'himtok' model, not a shaper"):
        bench.main(["--model", str(himtok), *common])
    model, proc = _model(tokenizer_dir, seed=3)
    Segmenter(shaper_from_himtok(model, proc), proc).save_pretrained(tmp_path / "untrained")
    with pytest.raises(SystemExit, match="has no train_summary.json"):
        bench.main(["--model", str(tmp_path / "untrained"), *common])
    assert not out.exists()


@pytest.mark.parametrize("case", ["unset", "missing", "stamp", "backbone", "setting", "probe"])
def test_training_init_errors_are_clear(case, tmp_path, tokenizer_dir, synthref_root, capsys):
    from mmseg.cli import main

    if case == "stamp":
        model, proc = tiny_model()
        Segmenter(model, proc).save_pretrained(tmp_path / "stamp")
    init = {"unset": None, "missing": str(tmp_path / "nowhere"), "stamp": str(tmp_path / "stamp"),
            "backbone": str(tmp_path / "nowhere"), "setting": str(tmp_path / "nowhere"),
            "probe": str(tmp_path / "nowhere")}[case]
    preset = _preset(tmp_path, init, **({"memory_text": True, "mismatch_probe": True} if case == "probe" else {}))
    if case == "backbone":
        data = json.loads(preset.read_text())
        data["model"]["lm"] = {"hidden_size": 64}
        preset.write_text(json.dumps(data))
    if case == "setting":  # any backbone setting, not only vision/lm, would be ignored: it is an error
        data = json.loads(preset.read_text())
        data["model"]["image_attention"] = "bidirectional"
        preset.write_text(json.dumps(data))
    code = main(["train", "--config", str(preset), "--data", str(synthref_root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    expected = {"unset": 'set "init_from"', "missing": "no HiMTok checkpoint at",
                "stamp": "is a 'stamp' model, not a HiMTok one",
                "backbone": "takes its backbone and tokenizer from head.init_from",
                "setting": "remove model.image_attention from the preset",
                "probe": "set head.own_answers"}[case]
    assert expected in err
    if case in ("unset", "missing"):  # the message says how to get a HiMTok checkpoint
        assert "mmseg train --config tiny-himtok" in err


def test_the_preset_names_the_himtok_checkpoint():
    from mmseg.config import load_preset
    from mmseg.modeling.heads import head_config

    preset = load_preset("tiny-shaper")
    cls, config = head_config(preset.model.head)
    assert cls is ShaperHead and config.init_from == "checkpoints/synthref-himtok" and config.invoke == "learned"
    assert cls.trainer() is not None


# -- wherever a head works ------------------------------------------------------------------------------------------
def test_the_ui_and_the_predict_command_take_the_shaper(forced, tmp_path, monkeypatch):
    from mmseg.cli import main
    from ui.core import Heads, answer, keep_tokens_option, prepare_image

    _, shaper, proc = forced
    heads = Heads([Segmenter(shaper, proc)])
    assert heads.names == ["shaper"] and heads.takes_tokens("shaper")
    result = answer(heads, "shaper", prepare_image(Image.new("RGB", (90, 60), (0, 200, 0))), [], "the green one",
                    keep_tokens_option(heads, "shaper", 8))
    assert result.text == "<seg>" and result.info[0]["keep_tokens"] == 8 and result.masks[0].shape == (60, 90)
    assert result.info[0]["invoke"] == "learned"

    Segmenter(shaper, proc).save_pretrained(tmp_path / "ckpt")
    original = ShaperHead.constrain

    def constrain(self, session, logits):  # the reloaded, untrained model still opens one mask
        return _opening_constrain(SimpleNamespace(constrain=lambda s, l: original(self, s, l), mt_start_id=self.mt_start_id,
                                                  mt_end_id=self.mt_end_id), proc.eos_token_id)(session, logits)

    monkeypatch.setattr(ShaperHead, "constrain", constrain)
    image = tmp_path / "x.png"
    Image.new("RGB", (70, 50), (0, 200, 0)).save(image)
    prefix = tmp_path / "out" / "p"
    command = ["predict", "--model", str(tmp_path / "ckpt"), "--image", str(image), "--query", "the green one",
               "--out", str(prefix)]
    assert main([*command, "--invoke", "always"]) == 0
    info = json.loads(Path(f"{prefix}_masks.json").read_text())["info"][0]
    assert info["invoke"] == "always" and info["invocations"] == 4 and info["invoked_at"] == [3, 7, 11, 15]
    assert main([*command, "--invoke", "often"]) == 2


# -- the code steer -------------------------------------------------------------------------------------------
def test_code_steer_terms_reach_only_the_later_codes():
    from mmseg.modeling.shaper import CodeSteer

    torch.manual_seed(0)
    steer = CodeSteer(dim=8, num_tokens=6, code_dim=3)
    c, codebook = torch.randn(2, 8), torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    assert steer(c, codebook, torch.tensor([-1, 2])).abs().sum() == 0  # zero at the start
    with torch.no_grad():
        steer.proj.weight.normal_()
    terms = steer(c, codebook, torch.tensor([-1, 2]))
    assert terms.shape == (2, 6, 10)
    assert (terms[0] != 0).all() and (terms[1, :3] == 0).all() and (terms[1, 3:] != 0).all()
    u = steer.proj(c).view(2, 6, 3)
    torch.testing.assert_close(terms[0], u[0] @ codebook.t())


def test_code_steer_joins_decoding_and_stage_one(pair, monkeypatch):
    """With ``steer_codes`` a shaping round's code terms change the later codes decoding picks, the stage-1
    objective adds the same terms to the codes after its injection point, and its gradient reaches the steer from
    the first step (it reads the translator's output, which is not zero at the start)."""
    from mmseg.train_shaper import ShapingObjective, freeze_for

    himtok, _, proc = pair
    shaper = shaper_from_himtok(himtok, proc, {"steer_codes": True}).eval()
    _wake(shaper)
    head = shaper.head
    monkeypatch.setattr(head, "constrain", _opening_constrain(head, proc.eos_token_id))
    silent, _, batch = _shaped_rollout(shaper, proc, QUERIES[0], monkeypatch)
    objective = ShapingObjective(shaper)
    freeze_for(shaper, 1)
    try:
        losses = objective(batch, torch.tensor([3]))
        losses["loss"].backward()
        assert head.code_steer.proj.weight.grad.abs().sum() > 0
        with torch.no_grad():
            head.code_steer.proj.weight.normal_(0, 0.5)
            steered = objective(batch, torch.tensor([3]))
        assert steered["shaped_ce"] != losses["shaped_ce"] and steered["base_ce"] == losses["base_ce"]
    finally:
        shaper.zero_grad()
        shaper.requires_grad_(True)
    loud, _, _ = _shaped_rollout(shaper, proc, QUERIES[0], monkeypatch)
    assert loud.masks[0][0].info["invoked_at"] == [3, 7, 11, 15]
    assert loud.tokens[0][:5] == silent.tokens[0][:5]  # <mt_start> and codes 0..3: chosen before the first round
    assert loud.tokens[0][5:K + 1] != silent.tokens[0][5:K + 1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the presets' mixed precision
        mixed = _generate(shaper, proc, QUERIES[:1], invoke="always")
    assert mixed.masks[0][0].info["invocations"] == 4 and torch.isfinite(mixed.masks[0][0].logits.float()).all()


def test_stage_one_reads_the_mask_queries_as_decoding_does(tokenizer_dir, monkeypatch):
    """On a HiMTok model whose readouts read mask queries, stage 1 runs the queries in both teacher-forced passes:
    with a zero shift its CE is the unshaped one, and a shift at <mt_start> (steer_start) reaches the readout."""
    from mmseg.train_shaper import ShapingObjective

    himtok, proc = _model(tokenizer_dir, seed=2, patch_readout=True, readout_query=True, readout_queries=True)
    with torch.no_grad():
        for p in himtok.head.readout.up.parameters():
            p.normal_()
    shaper = shaper_from_himtok(himtok, proc).eval()
    _wake(shaper)
    monkeypatch.setattr(shaper.head, "constrain", _opening_constrain(shaper.head, proc.eos_token_id))
    monkeypatch.setattr(shaper.head, "config", dataclasses.replace(shaper.head.config, steer_start=True))
    _, _, batch = _shaped_rollout(shaper, proc, QUERIES[0], monkeypatch)
    objective = ShapingObjective(shaper)
    with torch.no_grad():
        shaped = objective(batch, torch.tensor([-1]))
        seen = []
        original = shaper.head.readout_logits
        monkeypatch.setattr(shaper.head, "readout_logits", lambda *a: seen.append(original(*a)) or seen[-1])
        shaper.head.control.strengths.zero_()
        zero = objective(batch, torch.tensor([-1]))
    assert all(torch.isfinite(v) for v in shaped.values()) and shaped["shaped_ce"] != shaped["base_ce"]
    torch.testing.assert_close(zero["shaped_ce"], zero["base_ce"])
    assert len(seen) == 2 and seen[0].shape == (1, K, shaper.head.codebook_size)


@pytest.mark.parametrize("option", ["readout_query", "readout_queries"])
def test_steer_start_reads_a_mask_point_readout_before_the_point_is_recorded(tokenizer_dir, monkeypatch, option):
    """With ``steer_start`` the entropy and learned invokers read the readout at <mt_start> itself, inside
    after_step, before decoding records that mask point's state: the read takes the state just computed and is not
    kept, so the next constrain reads the shaped <mt_start> afresh."""
    from mmseg.modeling.heads.himtok import READOUT_KEY

    options = {"patch_readout": True, "readout_query": True, option: True}
    himtok, proc = _model(tokenizer_dir, seed=2, **options)
    shaper = shaper_from_himtok(himtok, proc).eval()
    _wake(shaper)
    head = shaper.head
    monkeypatch.setattr(head, "constrain", _opening_constrain(head, proc.eos_token_id))
    monkeypatch.setattr(head, "config", dataclasses.replace(head.config, steer_start=True))
    reads = []
    original = head.session_readout

    def spy(session, rows, steps, query=None):
        kept = dict(session.state.get(READOUT_KEY, {}))
        out = original(session, rows, steps, query)
        reads.append((query is not None, kept == session.state.get(READOUT_KEY, {})))
        return out

    monkeypatch.setattr(head, "session_readout", spy)
    for mode in ("entropy", "learned"):
        reads.clear()
        gen = _generate(shaper, proc, QUERIES, invoke=mode)
        for row in range(len(QUERIES)):
            assert len(gen.masks[row][0].info["mask_tokens"]) == K
        assert any(q for q, _ in reads) and all(unchanged for q, unchanged in reads if q)


# -- training after the frozen model's own answers (head.own_answers) -------------------------------------------
def test_own_answers_are_the_himtok_answers_and_leave_out_refusals(forced, synthref_root):
    """The pool both stages train after: the frozen model's answers with invocation off (HiMTok's exactly), one
    seeded request template per sentence, each with ``<seg>`` where its mask goes."""
    from contextlib import nullcontext

    from mmseg.data.prompts import SEGMENT_TEMPLATES
    from mmseg.data.refer import ReferDataset
    from mmseg.generation import answer_prefix_ids
    from mmseg.train_shaper import own_answers

    himtok, shaper, proc = forced
    data = ReferDataset(synthref_root, "synthref", "unc", "train")
    indices = [4, 0, 2]
    entries = own_answers(shaper, proc, data, indices, seed=5, autocast=nullcontext, batch_size=2, progress=False)
    assert [e["index"] for e in entries] == indices
    assert entries == own_answers(shaper, proc, data, indices, seed=5, autocast=nullcontext, progress=False)
    for entry in entries:
        sentence = data[entry["index"]].sentence
        assert entry["prompt"] in {t.format(expression=sentence) for t in SEGMENT_TEMPLATES}
        assert "<seg>" in entry["answer"]  # where the mask goes, as in a training answer
        assert answer_prefix_ids(proc, entry["answer"], shaper.head.mask_point_token_id)[-1] == shaper.head.mt_start_id
    # HiMTok's own answer to the same request, word for word
    expected = Segmenter(himtok, proc).batch([[{"role": "user", "content": e["prompt"]}] for e in entries],
                                             [data[e["index"]].image_path for e in entries])
    assert [e["answer"] for e in entries] == [a.text for a in expected]


def test_own_answers_leave_out_answers_without_a_mask(pair, synthref_root):
    from contextlib import nullcontext

    from mmseg.data.refer import ReferDataset
    from mmseg.train_shaper import own_answers

    _, shaper, proc = pair  # left alone, the untrained LM opens no mask: nothing for the shaper to steer
    data = ReferDataset(synthref_root, "synthref", "unc", "train")
    assert own_answers(shaper, proc, data, [0, 1], seed=0, autocast=nullcontext, progress=False) == []


def test_pick_sentences_weighs_types_as_training_draws():
    import random

    from mmseg.train_shaper import pick_sentences

    by_type = {"attribute": list(range(0, 600)), "relational": list(range(600, 900))}
    picked = pick_sentences(by_type, 300, {"relational": 2.0}, random.Random(0))
    assert len(picked) == len(set(picked)) == 300
    assert sum(i >= 600 for i in picked) == 150  # 300 sentences x 2 against 600 x 1: half and half
    assert picked == pick_sentences(by_type, 300, {"relational": 2.0}, random.Random(0))
    assert len(pick_sentences(by_type, 5000, {}, random.Random(0))) == 900  # never more than there are
    with pytest.raises(ValueError, match="leave no expression type"):
        pick_sentences(by_type, 10, {"attribute": 0, "relational": 0}, random.Random(0))


def test_own_answers_are_drawn_with_each_stages_share_of_misnamed_ones():
    import random

    from mmseg.modeling.heads.shaper import ShaperConfig
    from mmseg.train_shaper import draw_own

    pool = [{"index": i, "wrong": i < 10} for i in range(100)]
    mismatched = [e for e in pool if e["wrong"]]
    share = lambda s: sum(e["wrong"] for e in draw_own(pool, mismatched, 4000, s, random.Random(0))) / 4000  # noqa: E731
    assert abs(share(0.0) - 0.1) < 0.02 and abs(share(0.5) - 0.55) < 0.03 and share(1.0) == 1.0
    assert abs(sum(e["wrong"] for e in draw_own(pool, [], 4000, 1.0, random.Random(0))) / 4000 - 0.1) < 0.02
    # stage 2 draws at its own share when one is given (the invoker learns at the rate decoding meets), else stage 1's
    assert ShaperConfig(own_mismatch_share=0.5).policy_share == 0.5
    assert ShaperConfig(own_mismatch_share=0.5, policy_mismatch_share=0.0).policy_share == 0.0


@pytest.mark.slow
def test_training_after_own_answers_needs_answers_with_a_mask_and_keeps_them(synthref_root, tokenizer_dir, tmp_path,
                                                                              capsys, monkeypatch):
    import mmseg.train_shaper as train_shaper
    from mmseg.cli import main
    from mmseg.train_shaper import OWN_ANSWERS_FILE

    ckpt = _himtok_checkpoint(tokenizer_dir, tmp_path / "himtok")
    preset = _preset(tmp_path, str(ckpt), own_answers=3, own_mismatch_share=0.5, memory_text=True,
                     mismatch_probe=True)
    out = tmp_path / "shaper"
    args = ["train", "--config", str(preset), "--data", str(synthref_root), "--out", str(out), "--max-steps", "1"]
    # the untrained checkpoint refuses every request: a clear error, and no pool file that a rerun would trust
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "answered none of 3 training sentences with a mask" in err and "own_answers to 0" in err
    assert not (out / OWN_ANSWERS_FILE).exists()
    # a model that answers with masks (here: given answers; the real ones are tested above): the pool is written to
    # the run folder, recorded in the history, and both stages train after it
    entries = [{"index": i, "prompt": "Segment it.", "answer": "Sure, the thing <seg>."} for i in (0, 1)]
    asked = []
    monkeypatch.setattr(train_shaper, "own_answers", lambda model, proc, refer, indices, *a, **k: asked.append(
        list(indices)) or entries)
    assert main(args) == 0
    assert len(asked[0]) == 3 and [json.loads(line) for line in (out / OWN_ANSWERS_FILE).read_text().splitlines()] == entries
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert {"own_answers": 2, "own_asked": 3, "own_as_trained": 0.0}.items() <= history[0].items()
    # a rerun in the same folder trains after the same pool and never asks again
    monkeypatch.setattr(train_shaper, "own_answers", lambda *a, **k: pytest.fail("the pool was made again"))
    assert main([*args[:-1], "2"]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    one = [h for h in history if h["stage"] == 1 and "loss" in h]
    two = [h for h in history if h["stage"] == 2 and "reward" in h]
    assert one and np.isfinite(one[0]["shaped_ce"]) and two and two[0]["decisions"] > 0
    assert all(np.isfinite(h["mismatch_bce"]) for h in one)  # the probe trained against the pool's labels
