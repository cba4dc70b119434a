"""Training the HiMT mask tokenizer (the stage the HiMTok authors never released).

Masks come from any COCO-format ``instances.json`` (SynthRef, or real COCO / refCOCO annotations), placed in
their image frame as a square (letterboxed like the model input), mixed with procedurally generated shapes.
Each step draws a random keep length ``1..K`` per mask (tail tokens dropped), applies mild dilation/erosion, and
minimises BCE + Dice (boundary pixels weighted up) + the VQ loss. Dead codes are revived from recent latents.
With held-out masks (``val_data``: another SynthRef seed, or real annotations) the round-trip IoU at ``K`` and
``K/4`` tokens is logged every ``eval_every`` steps, measured in the masks' own frame as the benchmark does.
Re-running with the same output folder resumes.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mmseg.data.shapes import random_mask
from mmseg.masks import decode_segmentation
from mmseg.modeling.losses import dice_loss
from mmseg.modeling.mask_tokenizer import MaskTokenizer, MaskTokenizerConfig, mask_iou
from mmseg.train import lr_at

STATE_FILE = "tokenizer_train_state.pt"


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Place a bool ``(H, W)`` mask in a ``size x size`` square the way the model's image transform does."""
    from PIL import Image

    h, w = mask.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR)) > 127
    out = np.zeros((size, size), dtype=bool)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def instance_files(data_dirs: list[str | Path]) -> list[Path]:
    """The COCO ``instances.json`` files of ``data_dirs`` (each a file, or a folder holding ``instances.json`` or
    ``*/instances.json``); a folder without any is a clear error."""
    files: list[Path] = []
    for d in map(Path, data_dirs):
        found = [d] if d.is_file() else sorted(d.glob("instances.json")) + sorted(d.glob("*/instances.json"))
        if not found:
            raise FileNotFoundError(f"no instances.json in {d} (expected DATA/<dataset>/instances.json, COCO format)")
        files += found
    return files


def annotations(files: list[Path]) -> Iterator[tuple[object, int, int, str]]:
    """``(segmentation, height, width, category name)`` of every annotation with a mask in COCO instance ``files``."""
    for path in files:
        data = json.loads(Path(path).read_text())
        images = {im["id"]: im for im in data["images"]}
        names = {c["id"]: c["name"] for c in data.get("categories", [])}
        for ann in data["annotations"]:
            im = images.get(ann["image_id"])
            if im is not None and ann.get("segmentation"):
                yield (ann["segmentation"], int(im["height"]), int(im["width"]),
                       names.get(ann["category_id"], str(ann["category_id"])))


def load_masks(data_dirs: list[str | Path], n: int, frame: int | None = None) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` annotation masks of ``data_dirs`` as bool ``(n, S, S)``, each letterboxed into its image's
    square frame (``S``: the first image's longer side, or ``frame``), and their category names."""
    masks, kinds = [], []
    for seg, h, w, kind in itertools.islice(annotations(instance_files(data_dirs)), n):
        frame = frame or max(h, w)
        masks.append(letterbox_mask(decode_segmentation(seg, h, w), frame))
        kinds.append(kind)
    if not masks:
        raise ValueError(f"no annotation masks in {[str(d) for d in data_dirs]}")
    return np.stack(masks), kinds


@torch.no_grad()
def round_trip_iou(tok: MaskTokenizer, masks: torch.Tensor, ks: tuple[int, ...], batch: int = 64) -> dict[int, torch.Tensor]:
    """Per-mask IoU ``(N,)`` of ``decode(encode(m), keep=k)`` against ``m`` for each ``k`` in ``ks``: bool masks
    ``(N, S, S)``, compared at ``S`` (logits resampled there)."""
    s = masks.shape[-1]
    dev = tok.patch_pos.device
    ids = torch.cat([tok.encode(masks[i : i + batch].to(dev)) for i in range(0, len(masks), batch)])
    return {k: torch.cat([mask_iou(tok.decode(ids[i : i + batch], keep=k, size=(s, s)).cpu() > 0, masks[i : i + batch])
                          for i in range(0, len(masks), batch)]) for k in ks}


class MaskSource:
    """Annotation masks of one or more COCO instance files plus procedural shapes, drawn by a caller's RNG."""

    def __init__(self, instance_files: list[Path], size: int, procedural_fraction: float = 0.4) -> None:
        if not 0.0 <= procedural_fraction <= 1.0:
            raise ValueError(f"procedural_fraction must be in [0, 1], got {procedural_fraction}")
        self.size = size
        self.procedural_fraction = procedural_fraction
        self.items = [(seg, h, w) for seg, h, w, _ in annotations(instance_files)]
        if not self.items and procedural_fraction < 1:
            raise ValueError(f"no annotation masks found in {[str(p) for p in instance_files]}")

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        if not self.items or rng.random() < self.procedural_fraction:
            return random_mask(rng, self.size)
        seg, h, w = self.items[int(rng.integers(len(self.items)))]
        return letterbox_mask(decode_segmentation(seg, h, w), self.size)


def morph(masks: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mild random dilation or erosion (radius 1-2, half the masks) of ``(B, S, S)`` float masks."""
    out = []
    for m in masks:
        radius = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
        if radius:
            x, k = m[None, None], 2 * radius + 1
            x = F.max_pool2d(x, k, 1, radius) if rng.random() < 0.5 else -F.max_pool2d(-x, k, 1, radius)
            m = x[0, 0]
        out.append(m)
    return torch.stack(out)


def boundary_weights(target: torch.Tensor, strength: float = 4.0) -> torch.Tensor:
    """``(B, S, S)`` targets -> per-pixel weights, ``1 + strength`` within a pixel of an edge."""
    t = target[:, None]
    edge = (F.max_pool2d(t, 3, 1, 1) - (-F.max_pool2d(-t, 3, 1, 1))) > 0
    return 1.0 + strength * edge[:, 0].float()


def tokenizer_loss(model: MaskTokenizer, masks: torch.Tensor, keep: torch.Tensor,
                   at_frame: bool = False) -> dict[str, torch.Tensor]:
    """Loss of one batch: ``masks (B, S, S)`` float in {0, 1}, ``keep (B,)`` prefix lengths.

    ``at_frame``: compare in the masks' own ``S x S`` frame (logits resampled there, as the benchmark and the
    segmentation metrics see them) instead of against area-downsampled coverage at ``mask_size``. Why: there the
    loss scores exactly where the resampled decision boundary falls, which is what the round-trip IoU counts.
    """
    out = model(masks, keep)
    logits = out["logits"]
    if at_frame and masks.shape[-2:] != logits.shape[-2:]:
        logits = F.interpolate(logits[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        target = masks.float()
    else:
        target = model._to_input(masks)
    weights = boundary_weights(target)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weights)
    dice = dice_loss(logits, target)
    return {"bce": bce, "dice": dice, "vq": out["vq_loss"], "loss": bce + dice + out["vq_loss"],
            "latents": out["latents"], "logits": out["logits"], "ids": out["ids"]}


class TokenizerBatches(torch.utils.data.Dataset):
    """Training batches ``first, first + 1, ...``: ``(masks (B, S, S) float in {0, 1}, keep (B,) in 1..K)``.

    Batch ``step`` depends only on ``(seed, step)``, so loader workers (and resuming) change nothing but speed.
    """

    def __init__(self, source: MaskSource, seed: int, first: int, steps: int, batch_size: int, num_tokens: int) -> None:
        self.source, self.seed, self.first, self.steps = source, seed, first, steps
        self.batch_size, self.num_tokens = batch_size, num_tokens

    def __len__(self) -> int:
        return max(0, self.steps - self.first)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = self.batch_size, self.num_tokens
        rng = np.random.default_rng(self.seed * 1_000_003 + self.first + index)
        masks = morph(torch.from_numpy(np.stack([self.source.draw(rng) for _ in range(n)])).float(), rng)
        # Nested dropout: half the rows keep every token, the rest a uniform prefix length.
        keep = torch.where(torch.from_numpy(rng.random(n) < 0.5), torch.full((n,), k),
                           torch.from_numpy(rng.integers(1, k + 1, n)))
        return masks, keep


# Parameters that decide a mask's codes: frozen by ``train_part="decoder"``.
CODE_PARTS = ("patch_embed.", "patch_pos", "latents", "to_latents.", "encoder.", "encoder_norm.", "to_code.",
              "quantizer.")
TRAIN_PARTS = ("all", "decoder")


def init_tokenizer(folder: str | Path, config: MaskTokenizerConfig | None = None) -> tuple[MaskTokenizer, list[str]]:
    """A tokenizer built from ``config`` (default: the one in ``folder``) holding every tensor of the tokenizer in
    ``folder`` whose name and shape it shares; returns it with the names it did NOT take from there (new parts,
    e.g. another ``pixel_decoder``). A different codebook or latent count is refused (the codes would change)."""
    source = MaskTokenizer.from_pretrained(folder)
    config = config or source.config
    if (config.codebook_size, config.code_dim, config.num_tokens) != (
            source.config.codebook_size, source.config.code_dim, source.config.num_tokens):
        raise ValueError(f"cannot start from {folder}: its codebook ({source.config.num_tokens} tokens over "
                         f"{source.config.codebook_size}x{source.config.code_dim}) differs from the config's "
                         f"({config.num_tokens} over {config.codebook_size}x{config.code_dim})")
    model = MaskTokenizer(config)
    theirs = source.state_dict()
    mine = model.state_dict()
    taken = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    model.load_state_dict(taken, strict=False)
    return model, sorted(set(mine) - set(taken))


def train_tokenizer(data_dirs: list[str | Path], out_dir: str | Path, config: MaskTokenizerConfig | None = None,
                    steps: int = 20000, batch_size: int = 64, lr: float = 1e-3, max_minutes: float | None = None,
                    warmup_steps: int = 50, revive_every: int = 25,
                    seed: int = 0, progress: bool = True, log_every: int = 50, save_every: int = 500,
                    device: str | None = None, num_workers: int = 0, init: str | Path | None = None,
                    train_part: str = "all", mixed_precision: str = "no", val_data: list[str | Path] | None = None,
                    val_masks: int = 256, eval_every: int = 500, procedural_fraction: float = 0.4,
                    loss_at_frame: bool = False) -> dict:
    """Train (or resume) a mask tokenizer on the masks of ``data_dirs`` (folders holding ``*/instances.json``
    or ``instances.json`` files directly). Returns a summary with the final losses.

    ``device`` defaults to CUDA when available; ``num_workers`` loader processes draw batches ahead of the step
    (0: drawn in the loop). ``init``: start from this tokenizer folder (see :func:`init_tokenizer`; ignored when
    resuming). ``train_part="decoder"`` freezes the encoder and the codebook, so every mask keeps the codes it had
    under ``init`` and a HiMTok model trained with that tokenizer can take the retrained decoder as it is.
    ``mixed_precision="bf16"``: encoder and decoder under bf16 autocast (weights and the code search stay fp32).
    ``val_data``: folders (or files) of held-out annotations; the first ``val_masks`` of them are round-tripped
    every ``eval_every`` steps and at the end (history records with ``val_iou``, keyed by the kept token count).
    ``procedural_fraction``: share of training masks drawn from the procedural shapes instead of the annotations.
    ``loss_at_frame``: see :func:`tokenizer_loss`."""
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}; valid: no, bf16")
    if train_part not in TRAIN_PARTS:
        raise ValueError(f"unknown train_part {train_part!r}; valid: {', '.join(TRAIN_PARTS)}")
    if train_part == "decoder" and init is None and not (Path(out_dir) / STATE_FILE).is_file():
        raise ValueError('train_part "decoder" retrains the decoder of an existing tokenizer: name it with init '
                         '(mmseg train-tokenizer --init FOLDER)')
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls: the VQ stays in fp32 range
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(out_dir)
    files = instance_files(data_dirs)
    held_out = torch.from_numpy(load_masks(val_data, val_masks)[0]) if val_data else None
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        model = MaskTokenizer.from_pretrained(out_dir).train()
        state = torch.load(state_path, weights_only=True, map_location=device)
        if state.get("train_part", "all") != train_part:
            raise ValueError(f"{out_dir} was training train_part={state.get('train_part', 'all')!r}; resume it with "
                             f"that, or start another folder for train_part={train_part!r}")
    elif init is not None:
        model, fresh = init_tokenizer(init, config)
        model, state = model.train(), None
        if train_part == "decoder" and any(name.startswith(CODE_PARTS) for name in fresh):
            raise ValueError(f"cannot retrain only the decoder: the encoder or codebook of {init} does not fit the config "
                             f"({[n for n in fresh if n.startswith(CODE_PARTS)][:3]} ...)")
    else:
        model, state = MaskTokenizer(config or MaskTokenizerConfig()).train(), None
    frozen = train_part == "decoder"
    for name, param in model.named_parameters():
        param.requires_grad_(not (frozen and name.startswith(CODE_PARTS)))
    model.to(device)
    source = MaskSource(files, size=model.config.mask_size * 2, procedural_fraction=procedural_fraction)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01,
                                  betas=(0.9, 0.99))
    step, elapsed_before, history = 0, 0.0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        history = json.loads((out_dir / "tokenizer_history.json").read_text())
    start = time.perf_counter()
    k = model.config.num_tokens
    codes_in_use = model.config.codebook_size
    bar = tqdm(total=steps, initial=step, desc="train-tokenizer", disable=not progress)

    def validate() -> None:
        model.eval()
        ious = round_trip_iou(model, held_out, (k, max(1, k // 4)))
        model.train()
        history.append({"step": step, "val_iou": {str(n): round(float(v.mean()), 4) for n, v in ious.items()}})
        bar.write(f"step {step}: held-out round-trip IoU " + ", ".join(f"k={n} {float(v.mean()):.3f}"
                                                                      for n, v in ious.items()))

    def save() -> None:
        model.save_pretrained(out_dir)
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "train_part": train_part,
                    "elapsed_s": elapsed_before + time.perf_counter() - start}, state_path)
        (out_dir / "tokenizer_history.json").write_text(json.dumps(history))

    batches = iter(torch.utils.data.DataLoader(
        TokenizerBatches(source, seed, step, steps, batch_size, k), batch_size=None, num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None))
    try:
        while step < steps:
            masks, keep = (t.to(device, non_blocking=True) for t in next(batches))
            # With a time budget the cosine runs over the budget, so a timed run still ends at a low learning rate.
            progress_fraction = step / steps
            if max_minutes is not None:
                spent = (elapsed_before + time.perf_counter() - start) / (max_minutes * 60)
                progress_fraction = min(1.0, max(progress_fraction, spent))
            for group in optimizer.param_groups:
                # a plain float: the optimizer state is saved and reloaded with torch.load(weights_only=True)
                group["lr"] = float(lr_at(step, progress_fraction, lr, warmup_steps, min_ratio=0.1))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
                losses = tokenizer_loss(model, masks, keep, at_frame=loss_at_frame)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            if step % revive_every == 0 and not frozen:
                # Codes unused over the last window are re-seeded from this batch's latents.
                codes_in_use = model.config.codebook_size - model.quantizer.revive_dead_codes(
                    F.normalize(losses["latents"].detach().flatten(0, 1), dim=-1))
            if step % log_every == 0:
                record = {"step": step,
                          **{n: round(float(losses[n].detach()), 4) for n in ("loss", "bce", "dice", "vq")},
                          "codes_in_use": codes_in_use}
                history.append(record)
                bar.set_postfix(loss=record["loss"], dice=record["dice"], codes=record["codes_in_use"])
            out_of_time = max_minutes is not None and elapsed_before + time.perf_counter() - start > max_minutes * 60
            if held_out is not None and (step % eval_every == 0 or step == steps or out_of_time):
                validate()
            if step % save_every == 0 or step == steps or out_of_time:
                save()
            if out_of_time:
                break
    finally:
        batches = None  # the last reference: the loader shuts its workers down (also on an error)
    bar.close()
    save()
    return {"step": step, "elapsed_s": round(elapsed_before + time.perf_counter() - start, 1),
            **next((r for r in reversed(history) if "loss" in r), {}),
            **next(({"val_iou": r["val_iou"]} for r in reversed(history) if "val_iou" in r), {})}
