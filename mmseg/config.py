"""Frozen configuration dataclasses.

The whole model is described by one :class:`ModelConfig` (vision tower, LM, projector, mask head) and a run by
one :class:`TrainConfig`. Presets are JSON files in ``mmseg/configs``; unknown keys fail loudly so a typo in a
preset never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build a dataclass from ``data``, refusing keys the dataclass does not have."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    for field in dataclasses.fields(cls):
        if field.name in data:
            _check_scalar(data[field.name], field.type, f"{where}.{field.name}")
    return cls(**data)


# Scalar annotations checked on load (a preset file or a --set override): a wrong type fails here, with the key's
# name, instead of deep inside training. Other annotations (tuples, mappings) are left to the code that reads them.
_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_scalar(value: Any, annotation: Any, where: str) -> None:
    names = [part.strip() for part in str(annotation).split("|")]
    if not names or not all(n in _SCALARS or n == "None" for n in names):
        return
    if value is None and "None" in names:
        return
    allowed = tuple(t for n in names if n in _SCALARS for t in _SCALARS[n])
    # bool is an int in Python, but a flag given where a count is expected is a mistake (and vice versa)
    if isinstance(value, allowed) and isinstance(value, bool) == ("bool" in names):
        if isinstance(value, float) and value != value:
            raise ValueError(f"{where}: NaN is not a valid value")
        return
    raise ValueError(f"{where}: expected {' or '.join(names)}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class VisionConfig:
    """Vision tower. ``kind`` picks the adapter:

    - ``open_clip``: ``name`` is an open_clip architecture (``ViT-B-16``) with an optional ``pretrained`` tag
      or local weights file; with ``name=None`` a tiny ViT is built from ``width/layers/heads``.
    - ``hf``: ``name`` is a Hugging Face id or local folder of a CLIP/SigLIP (or any ``AutoModel``) vision model.

    ``hf_config`` is filled in when a model is saved so that reloading never needs the hub.
    """

    kind: str = "open_clip"
    name: str | None = None
    pretrained: str | None = None
    image_size: int = 128
    patch_size: int = 16
    width: int = 192
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # Tiny open_clip ViTs only: "patch" embeds each patch with one linear map (the ViT default); "conv" uses a
    # stack of stride-2 3x3 convolutions (Xiao et al. 2021, "Early convolutions help transformers see better"),
    # which learns shape far faster from scratch (see mmseg.modeling.vision.ConvStem).
    stem: str = "patch"
    feature_layer: int = -1  # hf towers: which hidden state to read (-2 = penultimate, as LLaVA)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    hf_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class LMConfig:
    """Causal LM: a Hugging Face id/local folder (``name``), or a tiny model built from the fields below.

    ``hf_config`` (filled at save time) is the full transformers config, so a saved model reloads offline.
    """

    name: str | None = None
    model_type: str = "qwen2"
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate_size: int = 768
    max_position_embeddings: int = 1024
    # "sdpa" suits GPUs and long sequences. On a CPU with short sequences (~120 tokens) and a custom 4-D mask,
    # "eager" trains ~1.2x faster: the SDPA CPU backward is the slowest part of a tiny-stamp step
    # (benchmarks/train_step.py).
    attn_implementation: str = "sdpa"
    hf_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The whole model. ``head`` is ``{"name": <registered head>, **that head's options}``."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    head: dict[str, Any] = field(default_factory=lambda: {"name": "stamp"})
    tokenizer: str | None = None  # a tokenizer folder/id; None = the LM's own, or a trained byte-level BPE for tiny LMs
    max_text_tokens: int = 128
    # Normalise projected image features to the LM's token-embedding scale (see MLPProjector); for LMs and
    # projectors trained from scratch.
    projector_norm: bool = False
    # Merge m x m patches into one LM prefix token (heads still get one feature per patch); 1 = LLaVA's one
    # token per patch.
    image_merge: int = 1
    # Where the image goes in the first user turn: "before" the text (LLaVA) or "after" it. With "after", the
    # text's own hidden states never attend to the image (causal order), so an LM trained from scratch learns
    # to read the expression much sooner, and the image positions see the request they serve.
    image_position: str = "before"
    # Dense attribute supervision of the patch features (see mmseg.modeling.patch_probe): family -> class names,
    # e.g. {"kind": ["circle", ...], "color": ["red", ...]}; "kind" reads the annotation's category, any other
    # family the annotation's ``attributes[family]``. Empty = off.
    patch_labels: dict[str, list[str]] = field(default_factory=dict)
    # Adds a "size" family to the patch probe, derived from any object mask (no annotation needed): the class of a
    # patch is the bin of its object's equal-area radius, sqrt(area / image area), cut at these increasing edges
    # (len + 1 classes). Why: "the smaller circle" and "the biggest one" compare sizes, and the tower learns size
    # no faster than it learned shape without a dense signal. Empty = off.
    patch_size_bins: list[float] = field(default_factory=list)
    # Grounding probe (see mmseg.modeling.grounding): after this many LM layers, the image positions predict where
    # the answer's focus lies (needs image_position "after"). None = off.
    ground_layer: int | None = None
    # With ground_layer: write the grounding back into the LM's stream (mmseg.modeling.grounding.GroundingGate) instead
    # of only supervising the hidden states there.
    ground_gate: bool = False
    # With ground_gate: also write whether ANY cell matched (the gate's best cell) into the position right after the
    # image, the evidence a refusal ("There is no such object") needs; see GroundingGate. Not yet measured on its own
    # (session 5 tried it only together with HiMTok's codebook adapter), so no preset turns it on.
    ground_presence: bool = False
    # How image positions attend to each other in the LM: "causal" (LLaVA: raster order, a cell sees only the cells
    # before it) or "bidirectional" (prefix-LM style, as PaliGemma: every cell sees every cell, so a cell can
    # compare itself with objects right of or below it; text stays causal). The prefill builds the same mask, so
    # KV-cached generation sees what training saw.
    image_attention: str = "causal"

    @property
    def head_name(self) -> str:
        return str(self.head.get("name", ""))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        vision = _from_dict(VisionConfig, data.pop("vision", {}), "model.vision")
        if isinstance(vision.mean, list) or isinstance(vision.std, list):
            vision = dataclasses.replace(vision, mean=tuple(vision.mean), std=tuple(vision.std))
        lm = _from_dict(LMConfig, data.pop("lm", {}), "model.lm")
        head = data.pop("head", {"name": "stamp"})
        if not isinstance(head, dict) or "name" not in head:
            raise ValueError('model.head: expected a mapping with a "name" key, e.g. {"name": "stamp"}')
        return _from_dict(cls, {**data, "vision": vision, "lm": lm, "head": dict(head)}, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Steps are optimizer steps; ``max_minutes`` stops early on wall time."""

    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    # Progress (of steps or wall time) at which the cosine decay starts; before it the rate holds at ``lr`` after
    # warm-up (warmup-stable-decay). 0.0: the decay spans the whole run (plain cosine).
    decay_from: float = 0.0
    weight_decay: float = 0.05
    warmup_steps: int = 200
    max_steps: int = 20000
    max_minutes: float | None = None
    grad_clip: float = 1.0
    mixed_precision: str = "bf16"  # "no" | "bf16" | "fp16"
    qa_fraction: float = 0.2  # share of understanding (QA) samples mixed into each epoch
    # Share of referring samples drawn from the no-target expressions (the answer refuses, the mask is empty),
    # whenever the curriculum allows them; None: as often as the data has them (SynthRef: about 10%).
    no_target_fraction: float | None = None
    # Progress (of steps or wall time, as the curriculum) from which ``no_target_fraction`` applies; before it, the
    # data's own share. Why late: refusing an absent object named by a relation needs the relation learnt first.
    # Measured, 60 CPU minutes of tiny-stamp, seed-1 testB cIoU / testB no-target accuracy: data's 10% 0.66 / 0.79;
    # 25% throughout 0.58 / 0.90; 30% from 0.7 0.63 / 0.88; with relational sentences drawn 2x (type_weights),
    # 25% from 0.6 0.68 / 0.88 and 40% from 0.6 0.72 / 0.93 (the preset; on a faster CPU, so 7,640 steps
    # against 4,944; see the STAMP model card).
    no_target_from: float = 0.0
    # Weight of the first answer token's cross-entropy, relative to the answer's other tokens (1.0: plain mean).
    # That token decides between a target answer ("Sure, ...") and a refusal ("There is no ..."); it is one of
    # about ten answer tokens, so a relational no-target (~5% of samples) sends it little gradient. Weighting it
    # raises that signal for both classes alike, so it does not shift the refusal prior the way oversampling
    # no-target samples does, and it costs no target samples. Measured (60 CPU minutes of tiny-stamp, weight 4):
    # seed-1 val cIoU 0.67 against 0.81 at weight 1, testB no-target 0.78 against 0.79, so the preset keeps 1.
    decision_weight: float = 1.0
    # Weight of the answer's text cross-entropy (the logged ``text_ce`` is the weighted term). Its hard tokens are
    # few (the decision, and the words naming the referent: a relational sentence is resolved there), and it is a
    # mean over every scored token, so beside a head's dense mask losses its gradient into the LM is small.
    # Measured (session 22, tiny-himtok from scratch, 60 minutes on both cores; seed-1, 500 per split, own answers,
    # bf16 weights): 2 against 1 gave val / testA / testB cIoU 0.765 / 0.879 / 0.632 against 0.776 / 0.884 / 0.620 and
    # testB no-target accuracy 0.951 against 0.878 (39 against 36 of 41). 2 in tiny-himtok.
    text_weight: float = 1.0
    eval_every: int = 500
    eval_samples: int = 256
    save_every: int = 500
    log_every: int = 20
    seed: int = 0
    # Loader processes that build batches ahead of the step (0: built in the training loop).
    num_workers: int = 0
    # Memory for memoised training inputs (decoded, letterboxed images; label maps; placed masks), per process
    # (with loader workers, shared out among them: each keeps its own memo).
    # SynthRef's 10k training images need about 3 GB; 0 turns the memo off.
    cache_mb: float = 4096.0
    vocab_size: int = 1024  # byte-level BPE size when a tokenizer is trained for a tiny LM
    # Target answers name the referred object before <seg> ("Sure, the red circle on the left <seg>.").
    describe_targets: bool = True
    # With describe_targets: answers to relational requests first say where the anchor is, then name the object
    # in the relation to it ("The red star is at the top right, and the star left of it is the blue star at the
    # top <seg>."; see mmseg.data.prompts.relational_answer). SynthRef only: other sentences keep the one-step answer.
    # Measured (session 25, tiny-himtok with mask_loss_samples 8 and prefix_samples 4, 60 minutes from scratch on both
    # cores; seed-1, 500 per split, own answers): val / testB cIoU 0.719 / 0.603 against 0.783 / 0.600 without it, in
    # 3,165 steps against 3,811 (longer answers). The anchor's place was right in 152 of 200 testB answers, but the
    # target was named in only 41 of those 152. Off in the presets.
    reason_relations: bool = False
    patch_label_weight: float = 0.5  # weight of the patch-probe loss when the model has one
    # With a patch probe: the factor on the gradient that the LM and the mask head send back into the image
    # features (the probe's own gradient is unscaled). Their large, noisy gradients swamp AdamW's per-parameter
    # step for the vision tower, which then never learns shape (see PatchProbe).
    vision_grad_scale: float = 1.0
    ground_weight: float = 1.0  # weight of the grounding-probe loss when the model has one (ModelConfig.ground_layer)
    # Share of "Describe the objects in the image." samples (every object in reading order): teaches the LM to
    # read its image tokens by position before it must find them by content.
    list_fraction: float = 0.0
    # Curriculum: [[progress_from, [expression types]], ...]; from each progress fraction (of steps or wall
    # time, whichever is further) only those referring types are drawn; null types = all. Empty = no curriculum.
    curriculum: tuple = ()
    # Relative draw weight of each referring expression type, per sentence ({"relational": 2.0}: a relational
    # sentence is drawn twice as often as under uniform draws; unnamed types weigh 1). Where the budget is fixed,
    # it puts steps on the skills that lag (relations) instead of the ones already learnt (attributes).
    type_weights: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.type_weights, dict):
            raise ValueError(f'train.type_weights must be a mapping such as {{"relational": 2.0}}, got {self.type_weights!r}')
        for kind, weight in self.type_weights.items():
            if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"train.type_weights[{kind!r}] must be a number >= 0, got {weight!r}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if self.no_target_fraction is not None and not 0.0 <= self.no_target_fraction <= 1.0:
            raise ValueError(f"train.no_target_fraction must be in [0, 1], got {self.no_target_fraction}")
        if not 0.0 <= self.decay_from < 1.0:
            raise ValueError(f"train.decay_from must be in [0, 1), got {self.decay_from}")
        if not 0.0 <= self.no_target_from <= 1.0:
            raise ValueError(f"train.no_target_from must be in [0, 1], got {self.no_target_from}")
        if not self.decision_weight > 0:
            raise ValueError(f"train.decision_weight must be > 0, got {self.decision_weight}")
        if not self.text_weight > 0:
            raise ValueError(f"train.text_weight must be > 0, got {self.text_weight}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")

    def no_target_fraction_at(self, progress: float) -> float | None:
        """The share of no-target referring samples at ``progress`` in [0, 1] (None = the data's own)."""
        return self.no_target_fraction if progress >= self.no_target_from else None

    def types_at(self, progress: float) -> list[str] | None:
        """The expression types the curriculum allows at ``progress`` in [0, 1] (None = all)."""
        allowed = None
        for start, types in self.curriculum:
            if progress >= start:
                allowed = list(types) if types else None
        return allowed


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig


def list_presets() -> list[str]:
    """Names of the presets shipped in ``mmseg/configs``."""
    folder = resources.files("mmseg") / "configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def apply_overrides(data: dict[str, Any], overrides: list[str], name: str) -> dict[str, Any]:
    """Set ``section.key[.key...]=value`` entries (``train.batch_size=64``, ``model.head.tokenizer=path``) in a
    preset's parsed JSON. Values parse as JSON (numbers, true/false/null, lists) and otherwise stay strings;
    unknown keys are caught where the preset is built, with the valid ones listed."""
    data = json.loads(json.dumps(data))  # a deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.batch_size=64")
        if parts[0] not in ("model", "train"):
            raise ValueError(f"override {item!r}: the section must be 'model' or 'train', not {parts[0]!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data.setdefault(parts[0], {})
        for part in parts[1:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} in preset {name!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_preset(name_or_path: str | Path, overrides: list[str] | None = None) -> Preset:
    """Load a preset by name (``tiny-stamp``) or from a JSON file path, with optional ``SECTION.KEY=VALUE``
    overrides (see :func:`apply_overrides`)."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text, name = path.read_text(), path.stem
    else:
        valid = list_presets()
        if str(name_or_path) not in valid:
            raise ValueError(f"unknown preset {str(name_or_path)!r}; valid presets: {', '.join(valid)} (or a path to a .json file)")
        text = (resources.files("mmseg") / "configs" / f"{name_or_path}.json").read_text()
        name = str(name_or_path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"preset {name!r} is not valid JSON: {err}") from None
    if overrides:
        data = apply_overrides(data, overrides, name)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ValueError(f"preset {name!r}: unknown top-level key(s) {unknown}; valid: ['model', 'train']")
    return Preset(
        name=name,
        model=ModelConfig.from_dict(data.get("model", {})),
        train=_from_dict(TrainConfig, data.get("train", {}), f"preset {name}.train"),
    )


# Written by the training commands beside a checkpoint: {"preset": ..., "train": TrainConfig as a dict, ...}.
TRAIN_CONFIG_FILE = "train_config.json"


def saved_train_settings(model_dir: str | Path) -> dict[str, Any]:
    """The ``train`` settings a checkpoint folder was trained with (from its :data:`TRAIN_CONFIG_FILE`); {} for a
    folder without one (e.g. a model assembled from pretrained parts), so callers fall back to the defaults."""
    path = Path(model_dir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it should be the file the training command wrote") from err
    train = saved.get("train") if isinstance(saved, dict) else None
    return train if isinstance(train, dict) else {}


def trained_answer_form(model_dir: str | Path | None, fallback: TrainConfig | None = None) -> tuple[bool, bool]:
    """``(describe_targets, reason_relations)``: the form of answer the checkpoint in ``model_dir`` was trained to
    give (its saved train settings), ``fallback``'s (default: :class:`TrainConfig`'s defaults) where it saved none."""
    fallback = fallback or TrainConfig()
    saved = saved_train_settings(model_dir) if model_dir else {}
    return (bool(saved.get("describe_targets", fallback.describe_targets)),
            bool(saved.get("reason_relations", fallback.reason_relations)))
