"""Tiny model configs for tests: seconds to build, milliseconds to run."""

from __future__ import annotations

from mmseg.config import LMConfig, ModelConfig, VisionConfig

CORPUS = [
    "Please segment the red circle left of the blue square.",
    "How many circles are there? 2",
    "Sure, here it is. There is no such object in the image.",
    "What colour is the star? yellow",
] * 20


def tiny_config(head: str = "stamp", model_options: dict | None = None, **head_options) -> ModelConfig:
    """``model_options``: extra ModelConfig fields (e.g. ``projector_norm``, ``image_merge``)."""
    if head == "stamp":
        head_options = {"seg_kernel": True, "query_positions": True, "kernel_dim": 16, **head_options}
    options = {
        "vision": VisionConfig(kind="open_clip", image_size=64, patch_size=16, width=32, layers=1, heads=2),
        "lm": LMConfig(hidden_size=32, layers=2, heads=2, kv_heads=2, intermediate_size=64, max_position_embeddings=512),
        **(model_options or {}),
    }
    return ModelConfig(head={"name": head, **head_options}, **options)


def tiny_model(head: str = "stamp", seed: int = 0, model_options: dict | None = None, **head_options):
    import torch

    from mmseg.modeling.builder import build_model, build_tokenizer

    torch.manual_seed(seed)
    config = tiny_config(head, model_options, **head_options)
    tokenizer = build_tokenizer(config, CORPUS, vocab_size=300)
    model, processor = build_model(config, tokenizer)
    return model.eval(), processor


def losses_under_one_seed(batch, *models) -> list[dict]:
    """Each model's loss terms on ``batch`` under the same random draws (sampled prefixes and rows)."""
    import torch

    out = []
    with torch.no_grad():
        for model in models:
            torch.manual_seed(0)
            out.append(model(batch))
    return out


def force_answer(answer_ids):
    """A ``constrain`` that makes the model say ``answer_ids`` (so an untrained model emits a mask)."""

    def constrain(session, logits):
        import torch

        step = len(session.tokens[0])
        out = torch.full_like(logits, -1e9)
        out[:, answer_ids[min(step, len(answer_ids) - 1)]] = 0
        return out

    return constrain
