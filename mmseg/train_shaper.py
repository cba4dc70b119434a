"""Training of the ``shaper`` head, in two stages on a frozen HiMTok model (``mmseg train --config tiny-shaper``).

``mmseg train`` dispatches here through :meth:`ShaperHead.trainer`. The run starts from the HiMTok checkpoint named
by the preset's ``head.init_from`` (vision tower, projector, LM, text and mask tokenizers and the HiMTok options are
taken from it; the preset's ``model.vision`` / ``model.lm`` must stay unset).

- **Stage 1, teacher-forced** (``train.max_steps`` steps, ``train.lr``, ``train.batch_size``): backbone and HiMTok
  head frozen; per mask one random injection point ``i`` among the checkpoints; the condensers, translator and
  control shaper compute the shift from the teacher-forced hidden states, it is added to mask token ``i``'s input
  embedding, the sequence is re-run, and the loss is the cross-entropy on the mask tokens AFTER the injection
  (over the mask vocabulary, as decoding is constrained) plus HiMTok's hierarchical mask loss on the shaped
  logits. ``base_ce`` (the same CE without the shift) is logged beside it.
- **Stage 2, REINFORCE** (``head.policy_steps`` steps): the learned invoker samples invoke / continue at each
  checkpoint of ``head.policy_group`` rollouts per query (the answer text forced up to ``<mt_start>``, the mask
  tokens generated); reward = IoU(decoded mask, ground truth) - IoU of the same query without invocation
  - ``head.invoke_cost`` per invocation; advantage = reward - its group's mean. (Within a group the no-invoke IoU
  is a constant and cancels in the advantage; it keeps the logged reward readable as "gain over HiMTok".)

Only referring samples with a target are drawn (the shaper steers masks; QA pairs, ``train.qa_fraction`` and the
curriculum do not apply). With ``head.own_answers`` = N, the frozen model first answers N training sentences itself
(``own_answers.jsonl`` in the run folder; ``train.type_weights`` weigh the expression types) and both stages train
after those answers instead of the true ones: the goal stays the true target's mask, so the shaper meets answers
whose words name another object, which is where a HiMTok answer goes wrong (``head.own_mismatch_share`` draws that
share of the samples from them). ``--max-steps`` caps the steps of EACH stage (a finished stage is not reopened on
resume); ``--max-minutes`` is the whole run, stage 2 getting the last ``head.policy_time_share`` of it. Re-running with the same ``--out`` resumes (stage, step, optimizers, RNG); every
save writes a loadable shaper checkpoint, ``history.jsonl`` and ``curve.png``.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmseg.config import TRAIN_CONFIG_FILE, ModelConfig, Preset, trained_answer_form
from mmseg.data.prompts import SEGMENT_TEMPLATES, segment_answer, segment_prompt, target_description
from mmseg.modeling.heads.shaper import ShaperConfig, ShaperHead, shaper_from_himtok
from mmseg.modeling.model import CONFIG_FILE, MMSegModel
from mmseg.modeling.shaper.invoker import NUM_FEATURES, group_advantages, reinforce_loss
from mmseg.processing import SEG_TOKEN
from mmseg.train import CURVE_FILE, HISTORY_FILE, STATE_DIR, lr_at

PROGRESS_FILE = "progress.json"
OWN_ANSWERS_FILE = "own_answers.jsonl"  # the frozen model's answers both stages train after (head.own_answers)
HIMTOK_COMMAND = "mmseg train --config tiny-himtok --data DATA_ROOT --out {folder}"


# -- the starting model -------------------------------------------------------------------------------------
def init_model(preset: Preset, options: ShaperConfig) -> tuple[MMSegModel, Any]:
    """The shaper model on the HiMTok checkpoint ``options.init_from`` (clear errors when it is missing or is
    not a HiMTok model)."""
    from mmseg.modeling.builder import is_checkpoint, load_pretrained

    default = asdict(ModelConfig())
    set_here = sorted(name for name, value in asdict(preset.model).items()
                      if name != "head" and value != default[name])
    if set_here:  # they would be silently ignored: the backbone (and every setting of it) is init_from's
        raise ValueError(f"preset {preset.name!r}: the shaper takes its backbone and tokenizer from head.init_from; "
                         f"remove model.{', model.'.join(set_here)} from the preset")
    if not options.init_from:
        example = "checkpoints/synthref-himtok"
        raise ValueError('the shaper head trains from a HiMTok checkpoint: set "init_from" in the preset\'s head, e.g. '
                         f'"{example}" (train one with `{HIMTOK_COMMAND.format(folder=example)}`)')
    folder = Path(options.init_from).expanduser()
    if not is_checkpoint(folder):
        where = folder if folder.is_absolute() else f"{folder} (relative to the current directory {Path.cwd()})"
        raise FileNotFoundError(f"init_from: no HiMTok checkpoint at {where}; train one with "
                                f"`{HIMTOK_COMMAND.format(folder=folder)}` or point head.init_from at one")
    try:
        head_name = json.loads((folder / CONFIG_FILE).read_text())["model"]["head"]["name"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"init_from: {folder / CONFIG_FILE} is unreadable: {err}") from None
    if head_name != "himtok":
        raise ValueError(f"init_from: {folder} is a {head_name!r} model, not a HiMTok one; the shaper steers HiMTok's "
                         "mask tokens and starts from a himtok checkpoint")
    himtok, processor = load_pretrained(folder)
    shaper_options = {k: v for k, v in preset.model.head.items() if k != "name"}
    model = shaper_from_himtok(himtok, processor, shaper_options, asset_dir=folder)
    return model, processor


def freeze_for(model: MMSegModel, stage: int) -> None:
    """Only the stage's own parts train: stage 1 the condensers, translator and control shaper; stage 2 the policy."""
    head: ShaperHead = model.head
    model.requires_grad_(False)
    if stage == 1:
        for module in head.shaper_modules().values():
            module.requires_grad_(True)
    else:
        head.policy.requires_grad_(True)


# -- the base's own answers ----------------------------------------------------------------------------------
def pick_sentences(by_type: dict[str, list[int]], count: int, type_weights: dict, rng: random.Random) -> list[int]:
    """About ``count`` distinct sample indices (each type's share rounded) from ``by_type`` (expression type ->
    indices), each type's share proportional to its sentence count times its ``type_weights`` entry (1 when
    unnamed), as training draws weigh them; a type never gives more sentences than it has."""
    weights = {t: len(ix) * float(type_weights.get(t, 1.0)) for t, ix in sorted(by_type.items()) if ix}
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"type_weights {type_weights} leave no expression type to draw among {sorted(by_type)}")
    picked: list[int] = []
    for kind, weight in weights.items():
        picked += rng.sample(by_type[kind], min(len(by_type[kind]), round(count * weight / total)))
    rng.shuffle(picked)
    return picked


def draw_own(pool: Sequence[dict], mismatched: Sequence[dict], count: int, share: float,
             rng: random.Random) -> list[dict]:
    """``count`` answers of the frozen model's own ``pool``, a share ``share`` of them drawn from ``mismatched``
    (the pool's answers whose words differ from the trained answer); ``share`` 0 or no mismatched answers: every
    pool answer as likely."""
    share = share if mismatched else 0.0
    picks = []
    for _ in range(count):
        source = mismatched if share and rng.random() < share else pool
        picks.append(source[rng.randrange(len(source))])
    return picks


def own_answers(model: MMSegModel, processor: Any, refer: Any, indices: Sequence[int], seed: int, autocast: Any,
                batch_size: int = 32, progress: bool = True) -> list[dict]:
    """The frozen model's own answers to training sentences ``indices`` of ``refer``, one random request template
    each (seed ``seed``), decoded with invocation off (exactly the HiMTok head's answers).

    Returns ``{"index", "prompt", "answer"}`` for every answer that opened a mask (``answer`` holds ``<seg>`` where
    the mask goes, as a training answer does); refusals of a present target are left out, as the shaper has no mask
    to steer there."""
    from tqdm.auto import tqdm

    from mmseg.predictor import Segmenter

    rng = random.Random(seed)
    segmenter = Segmenter(model, processor)
    entries: list[dict] = []
    model.eval()
    for start in tqdm(range(0, len(indices), batch_size), desc="own answers", unit="batch", disable=not progress):
        chunk = [int(i) for i in indices[start : start + batch_size]]
        samples = [refer[i] for i in chunk]  # one read each: a sample decodes its mask
        prompts = [segment_prompt(sample.sentence, rng) for sample in samples]  # in index order, as one pass would
        with autocast():
            answers = segmenter.batch([[{"role": "user", "content": prompt}] for prompt in prompts],
                                      [sample.image_path for sample in samples], invoke="never")
        entries += [{"index": i, "prompt": prompt, "answer": a.text}
                    for i, prompt, a in zip(chunk, prompts, answers) if SEG_TOKEN in a.text]
    return entries


# -- stage 1 ------------------------------------------------------------------------------------------------
class ShapingObjective(nn.Module):
    """Stage-1 loss as a module, so Accelerate/DDP can wrap it (gradients sync through its forward).

    ``forward(batch, points)``: the collator's batch and ``points (B,)``, the mask-token index to inject at per row
    (rows without a usable mask are skipped). Returns the weighted terms and ``loss``; ``base_ce`` is a no-grad
    reference (the same CE without the shift).
    """

    def __init__(self, model: MMSegModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], points: torch.Tensor) -> dict[str, torch.Tensor]:
        model, head = self.model, self.model.head
        ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        t = ids.shape[1]
        k = head.num_tokens
        start = batch["seg_positions"]
        rows = (start >= 0).nonzero()[:, 0]
        if rows.numel():  # as HiMTok's loss: spans the answer trains, all K codes inside the sequence
            fits = start[rows] + k + 1 < t
            labelled = labels[rows, (start[rows] + 1).clamp(max=t - 1)] != -100
            rows = rows[fits & labelled]
        output = model.lm.get_output_embeddings()
        code_pos = start[rows, None] + torch.arange(k, device=ids.device)[None]  # logits here predict the K codes
        row_ids = ids[rows]  # what the readouts read: the image positions, which no pass below changes

        def frozen_pass(ids: torch.Tensor, features: torch.Tensor | None = None):
            """The frozen model's teacher-forced pass over ``ids``: where the shaper reads its states."""
            embeds, features = model.embed_inputs(ids, batch["pixel_values"], features)
            extra = head.extra_inputs(batch, features)  # the head's mask queries, when its readouts read them
            hidden = model.text_hidden(embeds, ids, attention, extra)
            return embeds, features, extra, hidden[:, :t], hidden[:, t:]

        def base_code_logits(hidden: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
            """``(N, K, V)``: the frozen HiMTok's code logits at the rows' mask points (LM + readout)."""
            logits = output(hidden[rows[:, None], code_pos]).index_select(-1, head.code_token_ids).float()
            readout = head.readout_logits(row_ids, hidden[rows], hidden[rows, start[rows]],
                                          queries[rows] if head.queries is not None else None)
            return logits if readout is None else logits + readout

        with torch.no_grad():
            embeds, features, extra, hidden, queries = frozen_pass(ids)
            if head.config.own_code_inputs and rows.numel():
                # The codes decoding would feed: the frozen model's own choices (it predicts its codes in parallel
                # from the context, so one teacher-forced pass gives them), in place of the collator's inputs.
                own = head.code_token_ids[base_code_logits(hidden, queries).argmax(-1)]
                ids = ids.clone()
                ids[rows[:, None], code_pos + 1] = own
                embeds, features, extra, hidden, queries = frozen_pass(ids, features)
        trainable = [p for p in self.parameters() if p.requires_grad]
        if rows.numel() == 0:
            zero = sum(p.sum() for p in trainable) * 0.0
            out = {"shaped_ce": zero, "mask_bce": zero, "mask_dice": zero, "mask_prefix": zero, "loss": zero,
                   "base_ce": zero.detach()}
            if head.mismatch is not None:
                out["mismatch_bce"] = zero
            return out
        n, s = rows.numel(), start[rows]
        i = points.to(ids.device)[rows]
        pos = s + 1 + i  # sequence position of mask token i, the one whose input embedding is shifted
        # the ring buffer: the last R positions up to and including pos
        r = head.config.buffer_size
        recent_pos = pos[:, None] - torch.arange(r - 1, -1, -1, device=ids.device)[None]
        recent_valid = recent_pos >= 0
        recent_pos = recent_pos.clamp(min=0)
        recent_valid &= attention[rows[:, None], recent_pos].bool()
        recent = hidden[rows[:, None], recent_pos]
        # the span so far (<mt_start> and codes 0..i), padded, after the image positions
        span_len = i + 2
        span_pos = s[:, None] + torch.arange(int(span_len.max()), device=ids.device)[None]
        span_valid = torch.arange(int(span_len.max()), device=ids.device)[None] < span_len[:, None]
        span = hidden[rows[:, None], span_pos.clamp(max=t - 1)]
        prompt_mask = (labels[rows] == -100) & attention[rows].bool()
        p, image = head.prompt_summary(row_ids, hidden[rows], prompt_mask)
        text = text_valid = None
        if head.config.memory_text:  # every real text position before the span: the request and the answer's words
            before = torch.arange(t, device=ids.device)[None] < s[:, None]
            text_valid = before & attention[rows].bool() & (row_ids != head.image_token_id)
            text = hidden[rows]
        memory, memory_valid = head.long_memory(image, span, span_valid, text, text_valid)
        scale = probe_bce = None
        if head.mismatch is not None:  # read at <mt_start>, as decoding reads it; the rounds scaled by it
            if "words_wrong" not in batch:
                raise ValueError("mismatch_probe trains against the frozen model's own answers: set head.own_answers")
            logits = head.mismatch_logits(image, text, text_valid, hidden[rows, s], p)
            probe_bce = F.binary_cross_entropy_with_logits(logits, batch["words_wrong"][rows].float())
            scale = torch.sigmoid(logits).detach()  # the probe learns from its labels only, not from the shaped CE
        shift, steer = head.shift(model, recent, recent_valid, memory, memory_valid, p, i, scale)  # the grad paths
        shaped = embeds.clone()
        shaped[rows, pos] = shaped[rows, pos] + shift.to(shaped.dtype)
        shaped_hidden = model.text_hidden(shaped, ids, attention, extra)
        shaped_hidden, shaped_queries = shaped_hidden[:, :t], shaped_hidden[:, t:]
        code_logits = output(shaped_hidden[rows[:, None], code_pos]).index_select(-1, head.code_token_ids).float()
        # (N, K, V) from the prompt (and the <mt_start> state and the mask queries, when the head has them); None
        # without a readout. Read from the shaped pass, as decoding reads them: a shift injected at <mt_start>
        # (steer_start) reaches the gate's query and the queries; one after it changes neither.
        readout = head.readout_logits(row_ids, shaped_hidden[rows], shaped_hidden[rows, s],
                                      shaped_queries[rows] if head.queries is not None else None)
        if readout is not None:
            code_logits = code_logits + readout
        if steer is not None:  # steer_codes: terms for the shaped rows' later codes only
            code_logits = code_logits + steer
        target_codes = head.code_targets(labels[rows[:, None], code_pos + 1])  # (N, K) code indices
        after = torch.arange(k, device=ids.device)[None] > i[:, None]  # codes i+1 .. K-1 follow the injection
        targets = torch.where(after, target_codes, torch.full_like(target_codes, -100))
        ce = F.cross_entropy(code_logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        with torch.no_grad():
            base_logits = base_code_logits(hidden, queries)
            base_ce = F.cross_entropy(base_logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        cfg = head.config
        bce, dice, terms = head.hierarchical_loss(head.soft_codes(code_logits), batch["mask_targets"][rows],
                                                  *head.sample_prefix_rows(n), pixel_values=batch["pixel_values"][rows])
        w = cfg.mask_loss_weight
        out = {"shaped_ce": cfg.shaper_ce_weight * ce, "mask_bce": w * bce, "mask_dice": w * cfg.dice_weight * dice,
               "mask_prefix": w * cfg.prefix_weight * (terms.mean() if terms.numel() else bce * 0.0)}
        if probe_bce is not None:
            out["mismatch_bce"] = cfg.mismatch_weight * probe_bce
        out["loss"] = sum(out.values())
        out["base_ce"] = cfg.shaper_ce_weight * base_ce
        return out


# -- stage 2 ------------------------------------------------------------------------------------------------
class PolicyObjective(nn.Module):
    """Stage-2 loss as a module around the policy (DDP syncs its gradients): see :func:`reinforce_loss`."""

    def __init__(self, head: ShaperHead) -> None:
        super().__init__()
        self.policy = head.policy

    def forward(self, features: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor, rollouts: int) -> torch.Tensor:
        return reinforce_loss(self.policy, features, actions, advantages, rollouts)


def mask_iou(answer: Any, target) -> float:
    """IoU of an answer's masks (their union) with a bool ``(H, W)`` target; both empty counts as 1."""
    from mmseg.evaluation import predicted_mask
    from mmseg.metrics import mask_iou_stats

    inter, union = mask_iou_stats(predicted_mask(answer, target.shape), target)
    return inter / union if union else 1.0


def rollouts(model: MMSegModel, processor: Any, samples: Sequence[Any], prompts: Sequence[str], group: int,
             seed: int, texts: Sequence[str] | None = None) -> tuple[list[list[Any]], list[Any]]:
    """For each sample: ``group`` answers with the learned policy SAMPLED (seed ``seed``), and one without invocation.

    Answers come from :func:`mmseg.generation.generate` with the answer text forced up to ``<mt_start>`` (stage 2
    trains the mask-token decoding, not the text): ``texts``, one answer with ``<seg>`` per sample, the true one in
    the form the backbone was trained on or the frozen model's own (None: the one-step answer naming each target);
    masks are at each image's original size."""
    from mmseg.generation import answer_prefix_ids, generate
    from mmseg.imageio import load_image
    from mmseg.predictor import Answer, logits_to_original

    head: ShaperHead = model.head
    # The given words are forced (stage 2 trains mask-token decoding, not the text before it).
    if texts is None:
        texts = [segment_answer(True, target_description(sample)) for sample in samples]
    prefixes = [answer_prefix_ids(processor, text, head.mask_point_token_id) for text in texts]
    pixels, boxes, ids = [], [], []
    for sample, prompt in zip(samples, prompts):
        px, box = processor.preprocess_image(load_image(sample.image_path))
        pixels.append(px)
        boxes.append(box)
        ids.append(processor.encode_chat([{"role": "user", "content": prompt}])[0])
    pixels_t = torch.stack(pixels).to(model.device)

    def run(rows: list[int], options: dict) -> list[Any]:
        gen = generate(model, [ids[r] for r in rows], pixels_t[rows], eos_token_id=processor.eos_token_id,
                       pad_token_id=processor.pad_token_id, max_new_tokens=max(len(p) for p in prefixes) + 4,
                       options=options, answer_prefix=[prefixes[r] for r in rows])
        answers = []
        for row, r in enumerate(rows):
            masks = [(logits_to_original(m.logits, boxes[r], processor.image_size) > 0).cpu().numpy()
                     for m in gen.masks[row]]
            answers.append(Answer(text="", masks=masks, info=[m.info for m in gen.masks[row]]))
        return answers

    n = len(samples)
    sampled = run([r for r in range(n) for _ in range(group)], {"invoke": "learned", "sample_seed": seed})
    baseline = run(list(range(n)), {"invoke": "never"})
    return [sampled[r * group : (r + 1) * group] for r in range(n)], baseline


def policy_batch(answers: list[list[Any]], baseline: list[Any], targets: Sequence[Any], cost: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Rollouts -> every decision's ``features (M, F)``, ``actions (M,)`` and its rollout's advantage ``(M,)``, plus
    the step's means (reward, IoU with and without invocation, invocations per mask, invoke rate)."""
    group = len(answers[0])
    rewards = torch.zeros(len(answers), group)
    ious, invocations = [], []
    for q, (group_answers, base, target) in enumerate(zip(answers, baseline, targets)):
        base_iou = mask_iou(base, target)
        for g, answer in enumerate(group_answers):
            iou = mask_iou(answer, target)
            count = sum(info.get("invocations", 0) for info in answer.info)
            rewards[q, g] = iou - base_iou - cost * count
            ious.append(iou)
            invocations.append(count)
    advantages = group_advantages(rewards)
    features, actions, per_decision = [], [], []
    for q, group_answers in enumerate(answers):
        for g, answer in enumerate(group_answers):
            for info in answer.info:
                for decision in info.get("policy_trace", []):
                    features.append(decision["features"])
                    actions.append(float(decision["invoke"]))
                    per_decision.append(float(advantages[q, g]))
    stats = {"reward": float(rewards.mean()), "iou": sum(ious) / max(1, len(ious)),
             "iou_never": sum(mask_iou(b, t) for b, t in zip(baseline, targets)) / max(1, len(targets)),
             "invocations": sum(invocations) / max(1, len(invocations)),
             "invoke_rate": sum(actions) / max(1, len(actions)), "decisions": float(len(actions))}
    as_tensor = lambda values, shape: torch.tensor(values, dtype=torch.float32, device=device).reshape(shape)  # noqa: E731
    width = len(features[0]) if features else NUM_FEATURES
    return as_tensor(features, (-1, width)), as_tensor(actions, (-1,)), as_tensor(per_decision, (-1,)), stats


# -- validation and the curve -------------------------------------------------------------------------------
class _Recording:
    """A segmenter that remembers its answers' mask infos (to count invocations during validation)."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter
        self.infos: list[dict] = []

    def batch(self, conversations, images, **options):
        answers = self.segmenter.batch(conversations, images, **options)
        for answer in answers:
            self.infos.extend(answer.info)
        return answers


def validate(model: MMSegModel, processor: Any, val_set: Any, indices: list[int], modes: Sequence[str],
             autocast: Any) -> dict[str, float]:
    """cIoU / gIoU (own answers) and invocations per mask on validation samples, per invoke mode."""
    from mmseg.evaluation import evaluate_refer
    from mmseg.predictor import Segmenter

    metrics: dict[str, float] = {}
    model.eval()
    recorder = _Recording(Segmenter(model, processor))
    for mode in modes:
        recorder.infos = []
        with autocast():
            result = evaluate_refer(recorder, val_set, indices, batch_size=32, invoke=mode)
        metrics[f"val_ciou_{mode}"] = result["ciou"]
        metrics[f"val_giou_{mode}"] = result["giou"]
        calls = sum(i.get("invocations", 0) for i in recorder.infos)
        metrics[f"val_invocations_{mode}"] = calls / max(1, len(recorder.infos))
    return metrics


def plot_curve(history: list[dict], path: Path) -> None:
    """Stage-1 losses, stage-2 rewards and the validation cIoU per invoke mode against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    one = [h for h in history if h.get("stage") == 1 and "loss" in h]
    for key in ("shaped_ce", "base_ce", "mask_bce"):
        if one and key in one[0]:
            ax1.plot([h["step"] for h in one], [h[key] for h in one], label=key)
    ax1.set_title("stage 1 (teacher-forced)"), ax1.set_xlabel("step")
    two = [h for h in history if h.get("stage") == 2 and "reward" in h]
    for key in ("reward", "invoke_rate", "iou", "iou_never"):
        if two:
            ax2.plot([h["step"] for h in two], [h[key] for h in two], label=key)
    ax2.set_title("stage 2 (policy)"), ax2.set_xlabel("step")
    val = [h for h in history if any(k.startswith("val_ciou_") for k in h)]
    for mode in ("never", "always", "entropy", "learned"):
        pts = [(h["step"], h[f"val_ciou_{mode}"]) for h in val if f"val_ciou_{mode}" in h]
        if pts:
            ax3.plot(*zip(*pts), marker="o", label=mode)
    ax3.set_ylim(0, 1), ax3.set_title("validation cIoU"), ax3.set_xlabel("step")
    for ax in (ax1, ax2, ax3):
        if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the run ------------------------------------------------------------------------------------------------
def train_shaper(preset: Preset, data_dir: str | Path, out_dir: str | Path, max_minutes: float | None = None,
                 max_steps: int | None = None, progress: bool = True) -> dict:
    """Both stages from ``preset`` (a ``shaper`` head) on the SynthRef / REFER-layout data in ``data_dir``;
    checkpoints in ``out_dir`` (re-run to resume). Returns a summary with the last validation metrics."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from mmseg.data.collate import Collator, Example, ExamplePool, training_answer
    from mmseg.data.refer import ReferDataset
    from mmseg.modeling.builder import is_checkpoint, load_pretrained
    from mmseg.modeling.heads import head_config

    _, options = head_config(preset.model.head)
    if not isinstance(options, ShaperConfig):
        raise ValueError(f"train_shaper needs a shaper head, got {preset.model.head.get('name')!r}")
    if options.mismatch_probe and not options.own_answers:
        raise ValueError("head.mismatch_probe learns when the frozen model's own words name another object: set "
                         "head.own_answers (e.g. 3000) so that stage 1 trains after its own answers")
    cfg = replace(preset.train, **({"max_minutes": max_minutes} if max_minutes is not None else {}))
    steps1 = cfg.max_steps if max_steps is None else min(cfg.max_steps, max_steps)
    steps2 = options.policy_steps if max_steps is None else min(options.policy_steps, max_steps)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    set_seed(cfg.seed)
    for size, what in ((cfg.batch_size, "batch_size"), (options.policy_batch, "head.policy_batch")):
        if size % world:
            raise ValueError(f"{what} {size} is not divisible by {world} processes")

    state_dir = out_dir / STATE_DIR
    resuming = is_checkpoint(out_dir) and (state_dir / PROGRESS_FILE).is_file()
    if resuming:
        model, processor = load_pretrained(out_dir)
        if model.head.name != ShaperHead.name:
            raise ValueError(f"{out_dir} holds a {model.head.name!r} model with training state; use another --out")
    else:
        model, processor = init_model(preset, options)
    model = model.to(accelerator.device)
    head: ShaperHead = model.head

    train_set = ReferDataset(data_dir, "synthref", "unc", "train")
    val_set = ReferDataset(data_dir, "synthref", "unc", "val")
    # Answers take the form the backbone was trained to give (its saved settings), else the preset's.
    describe, reason = trained_answer_form(options.init_from, preset.train)
    pool = ExamplePool(train_set, [], train_set.image_root, describe_targets=describe, reason_relations=reason)
    target_types = [t for t in pool.by_type if t != "no_target"]
    target_indices = [i for t in target_types for i in pool.by_type[t]]
    if not target_indices:
        raise ValueError(f"{data_dir}: the train split has no referring expression with a target")
    collate = Collator(processor, head, cache_mb=cfg.cache_mb)
    val_indices = list(range(0, len(val_set), max(1, len(val_set) // cfg.eval_samples)))[: cfg.eval_samples]

    # Stage objects are prepared once, each while only its own parameters require grad, so that DDP registers
    # exactly those (a parameter in two DDP wrappers would be reduced twice).
    objective1, objective2 = ShapingObjective(model), PolicyObjective(head)
    freeze_for(model, 1)
    shaper_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in shaper_params if p.ndim >= 2]
    no_decay = [p for n, p in shaper_params if p.ndim < 2]
    optimizer1 = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    objective1, optimizer1 = accelerator.prepare(objective1, optimizer1)
    freeze_for(model, 2)
    optimizer2 = torch.optim.Adam(head.policy.parameters(), lr=options.policy_lr)
    objective2, optimizer2 = accelerator.prepare(objective2, optimizer2)

    # ``step`` counts the current stage's steps; history and the curve use the global step (stage 2 continues the
    # count where stage 1 ended).
    stage, step, stage1_done, elapsed_before, history = 1, 0, 0, 0.0, []
    if resuming:
        accelerator.load_state(str(state_dir))
        info = json.loads((state_dir / PROGRESS_FILE).read_text())
        stage, step, stage1_done, elapsed_before = info["stage"], info["step"], info["stage1_steps"], info["elapsed_s"]
        history_path = out_dir / HISTORY_FILE
        if history_path.exists():
            history = [json.loads(line) for line in history_path.read_text().splitlines()]
        reached = step if stage == 1 else stage1_done + step
        history = [h for h in history if h["stage"] < stage or (h["stage"] == stage and h["step"] <= reached)]
    elif accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    # The frozen model's own answers (head.own_answers): made once, on the main process, and kept in the run folder,
    # so that a resumed run (and every process) trains after the same ones.
    own: list[dict] = []
    mismatched: list[dict] = []  # the pool's answers whose words differ from the trained answer
    own_path = out_dir / OWN_ANSWERS_FILE
    if options.own_answers:
        asked = 0
        if accelerator.is_main_process and not own_path.is_file():
            picked = pick_sentences({t: pool.by_type[t] for t in target_types}, options.own_answers,
                                    dict(cfg.type_weights), random.Random(cfg.seed))
            entries = own_answers(model, processor, train_set, picked, cfg.seed, accelerator.autocast,
                                  progress=progress)
            if not entries:
                raise ValueError(f"head.own_answers: the model at {options.init_from} answered none of {len(picked)} "
                                 "training sentences with a mask; set own_answers to 0 to train after the true answers")
            tmp = own_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
            tmp.replace(own_path)  # whole or absent: an interrupted run makes them again
            asked = len(picked)
        accelerator.wait_for_everyone()
        own = [json.loads(line) for line in own_path.read_text().splitlines()]
        if asked or options.own_mismatch_share or options.mismatch_probe:  # each check reads a sample: only if used
            mismatched = [e for e in own
                          if e["answer"] != training_answer(train_set, train_set[e["index"]], describe, reason)]
        if asked:  # made in this run: recorded once
            history.append({"stage": 0, "step": 0, "elapsed_s": round(elapsed(), 1), "own_answers": len(own),
                            "own_asked": asked, "own_as_trained": round(1 - len(mismatched) / len(own), 4)})
    wrong_ids = {id(e) for e in mismatched}  # the pool entries whose words differ from the trained answer

    total_s = None if cfg.max_minutes is None else cfg.max_minutes * 60.0
    stage1_s = None if total_s is None else total_s * (1.0 - options.policy_time_share)
    last_metrics: dict = {}
    never_metrics: dict = {}  # the frozen HiMTok baseline does not change during the run: validated once
    bar: Any = None

    def save() -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(state_dir))
        if accelerator.is_main_process:
            model.save_pretrained(out_dir)
            processor.save_pretrained(out_dir)
            (state_dir / PROGRESS_FILE).write_text(json.dumps(
                {"stage": stage, "step": step, "stage1_steps": stage1_done, "elapsed_s": elapsed()}))
            (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(
                {"preset": preset.name, "train": asdict(cfg), "head": head.options(), "stage1_steps": steps1,
                 "stage2_steps": steps2, "data": str(data_dir), "world_size": world}, indent=2))
            (out_dir / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
            plot_curve(history, out_dir / CURVE_FILE)
        accelerator.wait_for_everyone()

    def evaluate(mode: str, global_step: int) -> dict:
        metrics: dict = {}
        if accelerator.is_main_process:
            if not never_metrics:
                never_metrics.update(validate(model, processor, val_set, val_indices, ["never"], accelerator.autocast))
            metrics = {**never_metrics, **validate(model, processor, val_set, val_indices, [mode], accelerator.autocast)}
            history.append({"stage": stage, "step": global_step, "elapsed_s": round(elapsed(), 1), **metrics})
            bar.write(f"stage {stage} step {global_step}: " + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        accelerator.wait_for_everyone()
        return metrics

    # ---- stage 1: teacher-forced shaping ----
    if stage == 1:
        checkpoints = head.checkpoints()
        bar = tqdm(total=steps1, initial=step, desc="shaper stage 1", disable=not (progress and accelerator.is_main_process))
        freeze_for(model, 1)
        model.eval()  # frozen backbone: no dropout (the shaper's parts have none)
        while step < steps1:
            fraction = step / steps1 if stage1_s is None else max(step / steps1, elapsed() / stage1_s)
            lr = lr_at(step, fraction, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_from)
            for group in optimizer1.param_groups:
                group["lr"] = lr
            rng = random.Random(cfg.seed * 1_000_003 + step)  # (seed, step) -> data: a resumed run sees the same
            wrong = None
            if own:
                entries = draw_own(own, mismatched, cfg.batch_size, options.own_mismatch_share, rng)
                drawn = [(train_set[e["index"]], e) for e in entries]
                examples = [Example(sample.image_path, e["prompt"], e["answer"], sample.mask) for sample, e in drawn]
                wrong = torch.tensor([id(e) in wrong_ids for _, e in drawn])  # the mismatch probe's labels
            else:
                examples = [pool.draw(rng, 0.0, target_types) for _ in range(cfg.batch_size)]
            points = torch.tensor([rng.choice(checkpoints) for _ in range(cfg.batch_size)])
            mine = slice(rank, None, world)
            batch = collate(examples[mine])
            if wrong is not None:
                batch["words_wrong"] = wrong[mine]
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                losses = objective1(batch, points[mine])
            accelerator.backward(losses["loss"])
            if cfg.grad_clip:
                accelerator.clip_grad_norm_([p for _, p in shaper_params], cfg.grad_clip)
            optimizer1.step()
            optimizer1.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == 1:
                record = {"stage": 1, "step": step, "elapsed_s": round(elapsed(), 1), "lr": lr,
                          **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
                history.append(record)
                bar.set_postfix(ce=f"{record['shaped_ce']:.3f}", base=f"{record['base_ce']:.3f}")
            out_of_time = stage1_s is not None and elapsed() >= stage1_s
            if step % cfg.eval_every == 0 or step == steps1 or out_of_time:
                last_metrics = evaluate("always", step)
            if out_of_time:
                break
            if step % cfg.save_every == 0 and step < steps1:
                save()
        bar.close()
        stage, stage1_done, step = 2, step, 0
        save()  # the stage boundary: a resume starts stage 2

    # ---- stage 2: the learned invoker ----
    freeze_for(model, 2)
    model.eval()
    group_size = options.policy_group
    per_process = options.policy_batch // world
    bar = tqdm(total=steps2, initial=step, desc="shaper stage 2", disable=not (progress and accelerator.is_main_process))
    while step < steps2 and not (total_s is not None and elapsed() >= total_s):
        rng = random.Random(cfg.seed * 1_000_003 + 7_919 * (step + 1))
        if own:  # after the frozen model's own words, as at inference
            entries = draw_own(own, mismatched, options.policy_batch, options.policy_share, rng)[rank::world]
            samples = [train_set[e["index"]] for e in entries]
            prompts, texts = [e["prompt"] for e in entries], [e["answer"] for e in entries]
        else:
            chosen = [rng.choice(target_indices) for _ in range(options.policy_batch)]
            templates = [rng.choice(SEGMENT_TEMPLATES) for _ in chosen][rank::world]  # varied phrasing, as stage 1
            samples = [train_set[i] for i in chosen[rank::world]]
            prompts = [template.format(expression=s.sentence) for template, s in zip(templates, samples)]
            texts = [training_answer(train_set, s, describe, reason) for s in samples]
        seed = (cfg.seed * 1_000_003 + step) * world + rank  # each process samples its own decisions
        answers, baseline = rollouts(model, processor, samples, prompts, group_size, seed, texts)
        features, actions, advantages, stats = policy_batch(answers, baseline, [s.mask for s in samples],
                                                            options.invoke_cost, accelerator.device)
        # policy_normalize: this step's decisions join the running input statistics (each process its own; DDP
        # broadcasts rank 0's buffers with the forward, so every process decides alike)
        head.policy.observe(features)
        loss = objective2(features, actions, advantages, per_process * group_size)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(list(head.policy.parameters()), cfg.grad_clip)
        optimizer2.step()
        optimizer2.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        global_step = stage1_done + step
        if step % cfg.log_every == 0 or step == 1:
            history.append({"stage": 2, "step": global_step, "elapsed_s": round(elapsed(), 1),
                            "policy_loss": round(float(loss.detach()), 5), **{k: round(v, 5) for k, v in stats.items()}})
            bar.set_postfix(reward=f"{stats['reward']:.3f}", invoke=f"{stats['invoke_rate']:.2f}")
        out_of_time = total_s is not None and elapsed() >= total_s
        if step % cfg.eval_every == 0 or step == steps2 or out_of_time:
            last_metrics = evaluate("learned", global_step)
        if step % cfg.save_every == 0 or step == steps2 or out_of_time:
            save()
    bar.close()
    summary = {"stage1_steps": stage1_done, "stage2_steps": step, "elapsed_s": round(elapsed(), 1), **last_metrics}
    if accelerator.is_main_process:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary
