"""The processor owns the token contract: image transform, chat format, special tokens, image placeholders.

Chat format (ChatML)::

    <|im_start|>user\\n<image>\\n{text}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n

``<image>`` is expanded to one placeholder per image patch; the model scatters projected patch features there.
User text is always encoded with special tokens split into ordinary bytes, so a user who types ``<seg>``
or ``<|im_end|>`` gets those characters, never the control tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "<seg>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
BASE_SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, SEG_TOKEN]
PROCESSOR_FILE = "processor_config.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if loop.first and message['role'] == 'user' %}<image>\n{% endif %}"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits inside the square model input (all in model-input pixels)."""

    original_size: tuple[int, int]  # (H, W) of the original image
    scale: float  # model pixels per original pixel
    pad_top: int
    pad_left: int
    content_size: tuple[int, int]  # (h, w) of the resized image inside the square

    def crop_box(self, side: int, grid: int) -> tuple[float, float, float, float]:
        """The content region in a ``grid``-sized map over a ``side``-pixel square: (top, left, bottom, right)."""
        f = grid / side
        return (self.pad_top * f, self.pad_left * f, (self.pad_top + self.content_size[0]) * f,
                (self.pad_left + self.content_size[1]) * f)


class ImageTransform:
    """Aspect-preserving resize of the longer side to ``size``, centred on a mean-coloured square, normalised."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, Letterbox]:
        """RGB PIL -> ``(3, size, size)`` float tensor and the :class:`Letterbox` to map masks back."""
        w, h = image.size
        scale = self.size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = image.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else image
        top, left = (self.size - nh) // 2, (self.size - nw) // 2
        canvas = self.mean.expand(3, self.size, self.size).clone()  # padding becomes 0 after normalisation
        content = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        canvas[:, top : top + nh, left : left + nw] = content
        pixels = (canvas - self.mean) / self.std
        return pixels, Letterbox((h, w), scale, top, left, (nh, nw))

    def mask_to_input(self, mask: np.ndarray, box: Letterbox) -> torch.Tensor:
        """Place an original-size bool mask ``(H, W)`` into the model square: float ``(size, size)`` in {0, 1}."""
        nh, nw = box.content_size
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR)
        out = torch.zeros(self.size, self.size)
        out[box.pad_top : box.pad_top + nh, box.pad_left : box.pad_left + nw] = (
            torch.from_numpy(np.asarray(small, dtype=np.float32)) / 255.0
        )
        return out


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int, extra_special: Sequence[str] = ()):
    """Train a byte-level BPE tokenizer (any text encodes; there is no unknown token) and wrap it as a
    ``PreTrainedTokenizerFast`` with our special tokens and chat template.

    ``vocab_size`` is the size of the TEXT vocabulary (our control tokens, bytes, merges); a head's tokens
    (``extra_special``, e.g. HiMTok's 1026 mask tokens) are appended after training, so they never crowd out
    the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = list(BASE_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    extra = [t for t in dict.fromkeys(extra_special) if t not in special]
    if extra:
        tok.add_special_tokens(extra)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=IM_END)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def ensure_special_tokens(tokenizer, extra_special: Sequence[str] = ()) -> int:
    """Add our control tokens to an existing (e.g. the LM's own) tokenizer; returns how many were new."""
    wanted = [t for t in dict.fromkeys([*BASE_SPECIAL_TOKENS, *extra_special]) if t not in tokenizer.get_vocab()]
    added = tokenizer.add_special_tokens({"additional_special_tokens": wanted}, replace_extra_special_tokens=False) if wanted else 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE
    return added


IMAGE_POSITIONS = ("before", "after")


class Processor:
    """Images and chat turns -> model inputs. Knows the number of patches so ``<image>`` expands correctly."""

    def __init__(self, tokenizer, image_size: int, num_patches: int, mean: Sequence[float], std: Sequence[float],
                 image_position: str = "before") -> None:
        if image_position not in IMAGE_POSITIONS:
            raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {image_position!r}")
        self.image_position = image_position
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_patches = num_patches
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = ImageTransform(image_size, mean, std)
        vocab = tokenizer.get_vocab()
        missing = [t for t in BASE_SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; call ensure_special_tokens first")
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.seg_token_id = vocab[SEG_TOKEN]
        self.eos_token_id = vocab[IM_END]
        self.pad_token_id = vocab[PAD_TOKEN]
        self._im_start = vocab[IM_START]

    # -- text -------------------------------------------------------------------------------------------
    def encode_user_text(self, text: str) -> list[int]:
        """Untrusted text: special-token strings are split into plain bytes (no control-token injection)."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_model_text(self, text: str) -> list[int]:
        """Trusted text (our training targets, the model's own past answers): ``<seg>`` etc. are tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _turn(self, role: str, body: list[int], close: bool = True) -> list[int]:
        header = [self._im_start] + self.encode_model_text(f"{role}\n")
        return header + body + ([self.eos_token_id] + self.encode_model_text("\n") if close else [])

    def encode_chat(self, messages: Sequence[dict], answer: str | None = None) -> tuple[list[int], list[int]]:
        """Encode a conversation. ``messages`` alternate user/assistant and end with a user turn; the image
        placeholder goes at the start of the first user turn. With ``answer`` the assistant's reply is appended
        and ``labels`` mark its tokens (others are -100); without it the ids end with the assistant header.

        Returns ``(input_ids, labels)`` as lists of ints.
        """
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("a conversation must end with a user message")
        ids: list[int] = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ("user", "assistant") or not isinstance(content, str):
                raise ValueError(f"message {i}: expected role 'user' or 'assistant' and text content, got {message!r}")
            if role == "user":
                body = self.encode_user_text(content)
                if i == 0:
                    image = [self.image_token_id] * self.num_patches
                    newline = self.encode_model_text("\n")
                    body = image + newline + body if self.image_position == "before" else body + newline + image
            else:
                body = self.encode_model_text(content)
            ids += self._turn(role, body)
        if i == 0 and messages[0]["role"] != "user":  # pragma: no cover - guarded above
            raise ValueError("the first message must come from the user")
        prompt = ids + self._turn("assistant", [], close=False)
        if answer is None:
            return prompt, [-100] * len(prompt)
        target = self.encode_model_text(answer) + [self.eos_token_id]
        return prompt + target, [-100] * len(prompt) + target

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids of an answer -> text; control tokens other than ``<seg>`` are dropped."""
        keep = [i for i in ids if i not in (self.eos_token_id, self.pad_token_id, self.image_token_id)]
        return self.tokenizer.decode(keep, skip_special_tokens=False).strip()

    # -- images -----------------------------------------------------------------------------------------
    def preprocess_image(self, image: Image.Image) -> tuple[torch.Tensor, Letterbox]:
        return self.transform(image)

    # -- persistence ------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        config = {"image_size": self.image_size, "num_patches": self.num_patches, "mean": self.mean, "std": self.std,
                  "image_position": self.image_position}
        (folder / PROCESSOR_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Processor":
        from transformers import AutoTokenizer

        folder = Path(folder)
        config = json.loads((folder / PROCESSOR_FILE).read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(tokenizer, config["image_size"], config["num_patches"], config["mean"], config["std"],
                   config.get("image_position", "before"))
