"""How much a HiMTok model's code predictions listen to the input embedding at a code position: the shaper's lever.

    python benchmarks/steerability.py --model checkpoints/synthref-himtok --data data/synthref-s1 [--samples 16]
                                      [--scales 1 3 10] [--json benchmarks/results/steerability.json]

The shaper (:mod:`mmseg.modeling.heads.shaper`) steers mask-token decoding by adding a control vector to the input
embedding of the current mask token. That only works if the frozen LM's later code predictions depend on that
input. This script teacher-forces ``--samples`` val sentences with masks, shifts ONE input embedding by a random
direction of ``scale`` x the mean embedding norm, and reports how far the code distributions at and after that
position move (mean KL(base || shifted) per code position, and the share of code positions whose argmax changes),
for a shift at the last text token before ``<mt_start>``, at ``<mt_start>``, and at the inputs of codes 4 and 16.
A model trained with ``code_input_noise`` 1.0 (every input code random in training) learns to ignore what sits at
code positions, and the shift there moves little.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.data.collate import Collator, ExamplePool  # noqa: E402
from mmseg.data.refer import ReferDataset, read_qa  # noqa: E402
from mmseg.modeling.builder import load_pretrained  # noqa: E402

# Where the shift goes, as an offset from <mt_start>: -1 the last text token, 0 <mt_start>, 1 + i the input of code i.
SITES = {"text token": -1, "<mt_start>": 0, "code 4 input": 5, "code 16 input": 17}


@torch.no_grad()
def code_logits(model, batch: dict[str, torch.Tensor], shift_at: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced code logits ``(B, K, V)`` at the K positions predicting the codes; with ``shift (B, D)`` added
    to the input embedding at ``shift_at (B,)``."""
    input_ids = batch["input_ids"]
    b = input_ids.shape[0]
    embeds, _ = model.embed_inputs(input_ids, pixel_values=batch["pixel_values"])
    if shift is not None:
        embeds = embeds.clone()
        embeds[torch.arange(b), shift_at] += shift.to(embeds.dtype)
    hidden = model.text_hidden(embeds, input_ids, batch["attention_mask"])
    head = model.head
    at = batch["seg_positions"][:, None] + torch.arange(head.num_tokens)
    return model.lm.get_output_embeddings()(hidden[torch.arange(b)[:, None], at]).index_select(
        -1, head.code_token_ids).float()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a HiMTok checkpoint folder")
    parser.add_argument("--data", required=True, help="SynthRef root (holding synthref/ and images/)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/steerability.json")
    args = parser.parse_args(argv)

    # Seeded: the collator swaps input codes at random when the model was trained with code_input_noise, from
    # torch's generator; without a seed every run would teacher-force other inputs.
    torch.manual_seed(args.seed)
    model, processor = load_pretrained(args.model)
    if model.head.name != "himtok":
        raise SystemExit(f"{args.model} has a {model.head.name!r} head; this measures HiMTok models")
    model.eval()
    data = ReferDataset(args.data, "synthref", "unc", "val")
    pool = ExamplePool(data, read_qa(args.data, "val"), data.image_root, describe_targets=True)
    rng = random.Random(args.seed)
    examples = []
    while len(examples) < args.samples:  # sentences whose answer carries a mask
        example = pool.draw(rng, 0.0)
        if example.mask is not None and bool(example.mask.any()):
            examples.append(example)
    batch = Collator(processor, model.head)(examples)
    start = batch["seg_positions"]
    base = code_logits(model, batch).log_softmax(-1)
    norm = float(model.lm.get_input_embeddings().weight.detach().norm(dim=-1).mean())
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for scale in args.scales:
        for site, offset in SITES.items():
            direction = F.normalize(torch.randn(len(examples), model.lm.config.hidden_size, generator=generator), dim=-1)
            shifted = code_logits(model, batch, start + offset, direction * norm * scale).log_softmax(-1)
            after = slice(max(0, offset), None)  # the code positions at and after the shifted input
            kl = (base.exp() * (base - shifted)).sum(-1)[:, after]
            flips = (base.argmax(-1) != shifted.argmax(-1))[:, after].float()
            rows.append({"scale": scale, "site": site, "kl": round(float(kl.mean()), 5),
                         "argmax_changed": round(float(flips.mean()), 4)})
    print(f"{args.model}: {len(examples)} teacher-forced val sentences, shift = scale x mean embedding norm ({norm:.3f})")
    print(f"{'scale':>6} {'shifted input':>15} {'KL per code':>12} {'argmax changed':>15}")
    for r in rows:
        print(f"{r['scale']:>6g} {r['site']:>15} {r['kl']:>12.4f} {r['argmax_changed']:>15.3f}")
    result = {"model": args.model, "data": args.data, "samples": len(examples), "embedding_norm": round(norm, 4),
              "code_input_noise": model.head.config.code_input_noise, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
