"""Training on Hugging Face Accelerate: the same code runs on one CPU, ``accelerate launch --num_processes 2``
(gloo on CPU) and multi-GPU.

Batches are drawn from (seed, step), each process taking its slice of the global batch, so a resumed run
sees exactly the data an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mmseg.config import TRAIN_CONFIG_FILE, Preset
from mmseg.data.collate import Collator, ExamplePool
from mmseg.data.prompts import (LIST_TEMPLATES, NO_TARGET_ANSWER, REGION_PHRASES, RELATIONAL_NO_TARGET_ANSWER,
                                 RELATIONAL_TARGET_ANSWER, SEGMENT_TEMPLATES, TARGET_ANSWER)
from mmseg.data.refer import ReferDataset, read_qa
from mmseg.modeling.builder import build_model, build_tokenizer, init_from_checkpoint, is_checkpoint, load_pretrained
from mmseg.modeling.model import MMSegModel
from mmseg.perf import count_flops, matmul_peak_gflops

STATE_DIR = "train_state"
HISTORY_FILE = "history.jsonl"
CURVE_FILE = "curve.png"


def text_corpus(refer: ReferDataset, qa: list[dict]):
    """Every string the tiny tokenizer should encode compactly: prompts, expressions, answers."""
    for template in SEGMENT_TEMPLATES:
        yield template.replace("{expression}", "")
    yield TARGET_ANSWER
    yield NO_TARGET_ANSWER
    yield from REGION_PHRASES  # described answers ("Sure, the red circle on the left <seg>.")
    for template in (RELATIONAL_TARGET_ANSWER, RELATIONAL_NO_TARGET_ANSWER):  # two-step relational answers
        yield re.sub(r"\{\w+\}", "", template)
    yield from LIST_TEMPLATES
    for ref in refer.refs:
        for sentence in ref["sentences"]:
            yield sentence["sent"]
            yield sentence["raw"]
    for item in qa:
        yield item["question"]
        yield item["answer"]


def lr_at(step: int, progress: float, base: float, warmup: int, min_ratio: float, decay_from: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then ``base`` until ``progress`` reaches ``decay_from``, then cosine
    decay to ``min_ratio * base`` as ``progress`` -> 1 (``decay_from`` 0: plain cosine after warm-up).

    ``progress`` is the larger of the step fraction and the wall-time fraction, so a run cut by
    ``--max-minutes`` still anneals fully instead of stopping at a high learning rate.
    """
    if not 0.0 <= decay_from < 1.0:
        raise ValueError(f"decay_from must be in [0, 1), got {decay_from}")
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    progress = max(0.0, progress - decay_from) / (1.0 - decay_from)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def probe_accuracy(model: MMSegModel, collate: Collator, pool: ExamplePool, indices: list[int],
                   batch_size: int = 32) -> dict[str, float]:
    """Share of object patches whose attribute (shape, colour, ...) the model's patch probe names correctly, per
    family, over the images of ``pool``'s samples at ``indices``: what the image features know, apart from
    whether the LM reads them."""
    counts: dict[str, list[int]] = {}
    rng = random.Random(0)
    for start in range(0, len(indices), batch_size):
        batch = collate([pool.segmentation(i, rng) for i in indices[start : start + batch_size]])
        features = model.image_features(batch["pixel_values"].to(model.device))
        scores = model.probe.object_accuracy(features, batch["patch_labels"].to(model.device), model.vision.grid_size)
        for family, (correct, total) in scores.items():
            tally = counts.setdefault(family, [0, 0])
            tally[0] += correct
            tally[1] += total
    return {family: correct / max(1, total) for family, (correct, total) in counts.items()}


class TrainClock:
    """Training progress in [0, 1] for the learning-rate schedule and the curriculum: the larger of the step
    fraction and the wall-time fraction, from a wall-clock start shared by every process, so that loader workers
    can read it too."""

    def __init__(self, wall_start: float, total_steps: int, deadline_s: float | None) -> None:
        self.wall_start, self.total_steps, self.deadline_s = wall_start, total_steps, deadline_s

    def progress(self, step: int) -> float:
        fraction = step / self.total_steps
        if self.deadline_s is not None:
            fraction = max(fraction, (time.time() - self.wall_start) / self.deadline_s)
        return min(1.0, fraction)


class StepBatches(torch.utils.data.Dataset):
    """Batches ``first, first + 1, ...`` made by ``make(step, progress)`` in DataLoader workers.

    Each batch depends only on its step (its random draw is seeded by it), so workers change nothing but speed,
    except that the curriculum phase of a batch is read off the clock when a worker builds it, a few steps
    ahead of its use: a batch at a phase boundary may come from the neighbouring phase.
    """

    def __init__(self, make, clock: TrainClock, first: int) -> None:
        self.make, self.clock, self.first = make, clock, first

    def __len__(self) -> int:
        return max(0, self.clock.total_steps - self.first)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        step = self.first + index
        return self.make(step, self.clock.progress(step))


def plot_curve(history: list[dict], path: Path) -> None:
    """Loss and validation metrics against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_ciou" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot([h["step"] for h in train], [h["loss"] for h in train], label="total")
        for key in ("text_ce", "mask_bce", "mask_dice", "patch_probe", "grounding"):
            if key in train[0]:
                ax1.plot([h["step"] for h in train], [h[key] for h in train], label=key, alpha=0.7)
        ax1.set_yscale("log")
    ax1.set_xlabel("step"), ax1.set_title("training loss"), ax1.legend()
    probes = sorted({k for h in val for k in h if k.startswith("val_probe_")})
    for key in ("val_ciou", "val_giou", "val_no_target_acc", "val_qa_exact_match", *probes):
        pts = [(h["step"], h[key]) for h in val if h.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=key[4:])
    ax2.set_ylim(0, 1), ax2.set_xlabel("step"), ax2.set_title("validation (own answers)"), ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train(preset: Preset, data_dir: str | Path, out_dir: str | Path, max_minutes: float | None = None,
          max_steps: int | None = None, progress: bool = True, init: str | Path | None = None) -> dict:
    """Train ``preset`` on the SynthRef (or REFER-layout) data in ``data_dir``; checkpoints go to ``out_dir``.

    Re-running with the same ``out_dir`` resumes from the last saved state. ``init``: a checkpoint folder whose
    tokenizer and weights a new run starts from (fine-tuning: fresh optimizer, warm-up and schedule; the preset's
    architecture must match it); a resumed run ignores it. Returns the last validation metrics.
    A head with its own training (:meth:`~mmseg.modeling.heads.base.MaskHead.trainer`, e.g. the shaper) runs that
    instead, with the same arguments.
    """
    from mmseg.modeling.heads import head_config

    head_cls, _ = head_config(preset.model.head)
    own_trainer = head_cls.trainer()
    if own_trainer is not None:
        if init is not None:
            raise ValueError(f"the {preset.model.head_name} head has its own training, which takes no init checkpoint")
        return own_trainer(preset, data_dir, out_dir, max_minutes=max_minutes, max_steps=max_steps, progress=progress)

    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    from mmseg.evaluation import evaluate_qa, evaluate_refer
    from mmseg.predictor import Segmenter

    cfg = replace(preset.train, **({"max_minutes": max_minutes} if max_minutes is not None else {}),
                  **({"max_steps": max_steps} if max_steps is not None else {}))
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    # A head may leave its parameters out of a step (e.g. STAMP when a process's slice holds no mask), so DDP
    # must look for unused parameters.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world = accelerator.num_processes
    if accelerator.device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    set_seed(cfg.seed)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")

    train_set = ReferDataset(data_dir, "synthref", "unc", "train")
    train_qa = read_qa(data_dir, "train")
    val_set = ReferDataset(data_dir, "synthref", "unc", "val")
    val_qa = read_qa(data_dir, "val")
    image_root = train_set.image_root

    state_dir = out_dir / STATE_DIR
    resuming = is_checkpoint(out_dir) and (state_dir / "progress.json").is_file()
    if resuming:
        model, processor = load_pretrained(out_dir)
        model.train()
    elif init is not None:
        model, processor = init_from_checkpoint(preset.model, init)
    else:
        tokenizer = build_tokenizer(preset.model, text_corpus(train_set, train_qa), cfg.vocab_size)
        model, processor = build_model(preset.model, tokenizer)
    collate = Collator(processor, model.head, patch_labels=model.probe.families if model.probe else None,
                       size_bins=model.config.patch_size_bins, focus=model.grounder is not None,
                       cache_mb=cfg.cache_mb / max(1, cfg.num_workers))  # each worker keeps its own memo
    pool = ExamplePool(train_set, train_qa, image_root, describe_targets=cfg.describe_targets,
                       with_objects=model.probe is not None, reason_relations=cfg.reason_relations)
    # Before the model moves: targets built on the host, whether in loader workers (which cannot use the parent's
    # accelerator) or in the loop, so that the worker count never changes them.
    model.head.host_targets()
    model.probe_weight = cfg.patch_label_weight
    model.ground_weight = cfg.ground_weight
    model.decision_weight = cfg.decision_weight
    model.text_weight = cfg.text_weight
    model.vision_grad_scale = cfg.vision_grad_scale

    # Frozen parameters (e.g. a head's frozen parts) stay out of the optimizer, so weight decay never moves them.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    total_steps = cfg.max_steps
    model, optimizer = accelerator.prepare(model, optimizer)
    step, history, elapsed_before = 0, [], 0.0
    if resuming:
        accelerator.load_state(str(state_dir))
        progress_info = json.loads((state_dir / "progress.json").read_text())
        step, elapsed_before = progress_info["step"], progress_info["elapsed_s"]
        history_path = out_dir / HISTORY_FILE
        history = [json.loads(line) for line in history_path.read_text().splitlines()] if history_path.exists() else []
        history = [h for h in history if h["step"] <= step]
    elif accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    def host_batch(step_index: int, progress: float = 0.0) -> dict[str, torch.Tensor]:
        """This process's slice of global batch ``step_index``, on the host (CPU)."""
        rng = random.Random(cfg.seed * 1_000_003 + step_index)
        types = cfg.types_at(progress)
        examples = [pool.draw(rng, cfg.qa_fraction, types, cfg.list_fraction, cfg.no_target_fraction_at(progress),
                              cfg.type_weights) for _ in range(cfg.batch_size)]
        # one seed per example for what the collator draws (e.g. HiMTok's code-input noise), so that neither the
        # process count nor loader workers change a batch
        seeds = [rng.getrandbits(32) for _ in examples]
        mine = slice(accelerator.process_index, None, world)
        return collate(examples[mine], seeds=seeds[mine])

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}

    def batch_for(step_index: int, progress: float = 0.0) -> dict[str, torch.Tensor]:
        return to_device(host_batch(step_index, progress))

    def save() -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(state_dir))
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(out_dir)
            processor.save_pretrained(out_dir)
            (state_dir / "progress.json").write_text(json.dumps({"step": step, "elapsed_s": elapsed()}))
            (out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(
                {"preset": preset.name, "train": asdict(cfg), "data": str(data_dir), "world_size": world,
                 "init": str(init) if init is not None else None}, indent=2))
            (out_dir / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
            plot_curve(history, out_dir / CURVE_FILE)
        accelerator.wait_for_everyone()

    val_indices = list(range(0, len(val_set), max(1, len(val_set) // cfg.eval_samples)))[: cfg.eval_samples]
    val_pool = ExamplePool(val_set, [], image_root, describe_targets=False, with_objects=True)

    def validate() -> dict:
        metrics: dict = {}
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.eval()
            segmenter = Segmenter(unwrapped, processor)
            with accelerator.autocast():
                refer = evaluate_refer(segmenter, val_set, val_indices, batch_size=32)
                qa = evaluate_qa(segmenter, val_qa[: cfg.eval_samples // 2], image_root, batch_size=32)
                seen = probe_accuracy(unwrapped, collate, val_pool, val_indices) if unwrapped.probe is not None else {}
            unwrapped.train()
            metrics = {"val_ciou": refer["ciou"], "val_giou": refer["giou"], "val_no_target_acc": refer["no_target_acc"],
                       "val_qa_exact_match": qa["qa_exact_match"], "val_named": refer["named"],
                       "val_by_type": {k: round(v["ciou"], 4) for k, v in refer["by_type"].items()},
                       **{f"val_probe_{family}": round(acc, 4) for family, acc in seen.items()}}
        accelerator.wait_for_everyone()
        return metrics

    # Throughput yardsticks, measured in this run: FLOPs per sample and the machine's matmul peak.
    peak_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    peak = matmul_peak_gflops(peak_dtype, device=accelerator.device)
    probe = batch_for(step)

    def probe_step() -> None:
        with accelerator.autocast():
            loss = model(probe)["loss"]
        loss.backward()

    flops_per_sample = count_flops(probe_step) / probe["input_ids"].shape[0]
    optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    deadline = None if cfg.max_minutes is None else cfg.max_minutes * 60.0
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (progress and accelerator.is_main_process))
    model.train()
    window_start, window_samples = time.perf_counter(), 0
    last_metrics: dict = {}
    wall_start = time.time() - elapsed_before
    if world > 1:  # one clock for every process, so that all slices of a step come from the same phase
        wall_start = broadcast_object_list([wall_start])[0]
    clock = TrainClock(wall_start, total_steps, deadline)
    prefetched = None
    if cfg.num_workers > 0:
        # Workers inherit the data pool and collator by fork (the batch builder is a closure, which spawn would
        # have to pickle).
        if "fork" not in torch.multiprocessing.get_all_start_methods():
            raise ValueError("train.num_workers > 0 needs the 'fork' start method, which this platform lacks; "
                             "set train.num_workers to 0")
        prefetched = iter(torch.utils.data.DataLoader(
            StepBatches(host_batch, clock, step), batch_size=None, num_workers=cfg.num_workers,
            pin_memory=accelerator.device.type == "cuda", prefetch_factor=4, persistent_workers=False,
            multiprocessing_context="fork"))
    try:
        while step < total_steps:
            progress_fraction = clock.progress(step)
            if world > 1:  # every process must use the same learning rate and curriculum phase
                progress_fraction = broadcast_object_list([progress_fraction])[0]
            lr = lr_at(step, progress_fraction, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_from)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch_for(step, progress_fraction) if prefetched is None else to_device(next(prefetched))
            with accelerator.autocast():
                losses = model(batch)
            accelerator.backward(losses["loss"])
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_samples += cfg.batch_size
            bar.update(1)
            if step % cfg.log_every == 0 or step == 1:
                seconds = time.perf_counter() - window_start
                sps = window_samples / seconds
                record = {"step": step, "elapsed_s": round(elapsed(), 1), "lr": lr,
                          "samples_per_s": round(sps, 2),
                          "peak_fraction": round(flops_per_sample * sps / 1e9 / peak, 3),
                          **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{sps:.1f}", peak=f"{record['peak_fraction']:.0%}")
                window_start, window_samples = time.perf_counter(), 0
            out_of_time = deadline is not None and elapsed() >= deadline
            if step % cfg.eval_every == 0 or step == total_steps or out_of_time:
                last_metrics = validate()
                if last_metrics:
                    history.append({"step": step, "elapsed_s": round(elapsed(), 1), **last_metrics})
                    bar.write(f"step {step}: " + json.dumps(last_metrics))
                window_start, window_samples = time.perf_counter(), 0
            if step % cfg.save_every == 0 or step == total_steps or out_of_time:
                save()
            if out_of_time:
                break
    finally:
        prefetched = None  # the last reference: the loader shuts its workers down (also on an error)
    bar.close()
    summary = {"step": step, "elapsed_s": round(elapsed(), 1), "flops_per_sample": flops_per_sample,
               "matmul_peak_gflops": round(peak, 1), **last_metrics}
    if accelerator.is_main_process:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary
